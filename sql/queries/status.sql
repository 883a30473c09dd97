-- Statements of shared/status.py (and consumer/progress.py's in_flight_progress). Nothing
-- here counts the messages of a log: lag comes from the ticks' offsets (pgcg.group_lag).

-- name: group_lag_total
-- The one number KEDA scales consumers on and `pgcg status` shows as total lag: messages
-- after the group's position, from the ticks' offsets (no counting). Helm renders it with
-- the group name as a quoted literal in place of the parameter.
SELECT coalesce(sum(lag), 0) AS lag FROM pgcg.group_lag(%(group)s)

-- name: groups
SELECT group_name, topic, generation, seek_gen, created_at, partitions
FROM pgcg.status_groups(%(group)s::text)

-- name: leader
SELECT leader_id, leader_epoch, heartbeat_age_s, alive
FROM pgcg.status_leader(%(group)s, %(leader_timeout_s)s::float8)

-- name: members
SELECT member_id, host, pid, joined_at, heartbeat_age_s, session_timeout_s
FROM pgcg.status_members(%(group)s)

-- name: partitions
-- Per partition: owner, epoch, state; lag (messages after the group's position, from the
-- ticks' offsets) and the age of the oldest of them (the first message after the position,
-- one index probe; the age of the first tick after it when that is older); messages in a
-- handler now (log messages the owner marked started under its epoch with no result
-- recorded yet, plus parked ones it claimed); the group's parked messages.
SELECT partition, member_id, epoch, state, target_member_id, revoke_in_s, lag, position_tick,
       oldest_age_s, in_flight, parked
FROM pgcg.status_partitions(%(group)s, %(topic)s)

-- name: dead_letters
SELECT pgcg.dead_letter_count(%(group)s) AS dead

-- name: losses
-- Messages the group lost to the topic's hard retention limit.
SELECT lost, last_at FROM pgcg.status_losses(%(group)s)

-- name: recent_rebalances
SELECT generation, leader_epoch, reason, members, moves, started_at, duration_ms
FROM pgcg.recent_rebalances(%(group)s, %(limit)s::bigint)

-- name: in_flight_progress
-- Handlers running right now that reported progress (consumer/progress.py; a handler that
-- reports progress runs as a parked delivery): who runs each, how far it got, and whether
-- it is overdue (no report within the visibility timeout: its consumer cancels it as stuck
-- and retries it). Only deliveries under the partition's current owner and epoch count.
-- `now` pins the clock in tests; null: now().
SELECT partition, message_id, key, member_id, epoch, attempt, percent, text, reported_at,
       locked_until, reported_age_s, deadline_in_s, overdue
FROM pgcg.in_flight_progress(%(group)s, %(now)s::timestamptz)

-- name: topics
-- Each topic's settings, its groups and the segment producers write into now.
SELECT name, id, partitions, segments, retention_ms, retention_bytes, hard_retention_ms,
       hard_retention_bytes, segment_bytes, current_segment, groups
FROM pgcg.status_topics(%(topic)s::text)

-- name: segments
-- The topic's segments still on disk and the last few reclaimed ones. `bytes`: the size of
-- its slot table (pgcg.log_<topic>_<k>, k = seq mod segments) while the segment lives there.
-- `due_in_s`: seconds until the retention time lets it go (negative: due).
SELECT seq, slot, state, bytes, created_at, sealed_at, reclaimed_at, due_in_s, ticked
FROM pgcg.status_segments(%(topic)s, %(current)s::bigint, %(reclaimed)s::bigint)

-- name: held
-- What keeps the oldest sealed segment on disk: per group and partition that still has a
-- message in it after its position, as pgcg.maintain's 'held' check decides (read only,
-- and an existence probe instead of a count). Rows of transactions still running at the
-- position's tick are looked for only when there were any.
SELECT group_name, partition, lag FROM pgcg.segment_holders(%(topic)s, %(seq)s::bigint)

-- name: producers
-- Transactions that still hold a segment's slot open for writing (a producer's enqueue
-- takes a shared advisory lock on it): sealing waits for them.
SELECT l.pid, a.application_name,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_s
FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = pgcg.slot_lock()::oid
  AND l.objid = pgcg.segment_slot(%(topic)s, %(seq)s::bigint)::oid
ORDER BY a.xact_start NULLS LAST
