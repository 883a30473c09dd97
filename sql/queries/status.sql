-- Statements of shared/status.py (and consumer/progress.py's in_flight_progress). Nothing
-- here counts the messages of a log: lag comes from the ticks' offsets (pgcg.group_lag).

-- name: group_lag_total
-- The one number KEDA scales consumers on and `pgcg status` shows as total lag: messages
-- after the group's position, from the ticks' offsets (no counting). Helm renders it with
-- the group name as a quoted literal in place of the parameter.
SELECT coalesce(sum(lag), 0) AS lag FROM pgcg.group_lag(%(group)s)

-- name: groups
SELECT g.group_name, g.topic, g.generation, g.seek_gen, g.created_at, t.partitions
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
WHERE %(group)s::text IS NULL OR g.group_name = %(group)s
ORDER BY g.group_name

-- name: leader
SELECT leader_id, leader_epoch,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s,
       extract(epoch FROM now() - heartbeat_at)::float8 < %(leader_timeout_s)s AS alive
FROM pgcg.coordinator_leader WHERE scope = %(group)s

-- name: members
SELECT member_id, host, pid, joined_at,
       extract(epoch FROM now() - last_heartbeat)::float8 AS heartbeat_age_s,
       session_timeout_ms / 1000.0 AS session_timeout_s
FROM pgcg.consumer_groups WHERE group_name = %(group)s
ORDER BY joined_at, member_id

-- name: partitions
-- Per partition: owner, epoch, state; lag (messages after the group's position, from the
-- ticks' offsets) and the age of the oldest of them (the first message after the position,
-- one index probe; the age of the first tick after it when that is older); messages in a
-- handler now (log messages the owner marked started under its epoch with no result
-- recorded yet, plus parked ones it claimed); the group's parked messages.
SELECT pa.partition, pa.member_id, pa.epoch, pa.state, pa.target_member_id,
       extract(epoch FROM pa.revoke_deadline - now())::float8 AS revoke_in_s,
       coalesce(gl.lag, 0) AS lag, gl.position_tick,
       CASE WHEN gl.lag > 0 THEN greatest(0, gl.age_s, (
           SELECT extract(epoch FROM now() - l.enqueued_at)::float8
           FROM pgcg.log AS l
           WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63 AND l.partition = pa.partition
             AND l."offset" > coalesce(k.offsets[pa.partition + 1], -1)
           ORDER BY l."offset" LIMIT 1)) END AS oldest_age_s,
       coalesce(fl.n, 0) + coalesce(pk.running, 0) AS in_flight,
       coalesce(pk.parked, 0) AS parked
FROM pgcg.partition_assignments AS pa
JOIN pgcg.groups AS g ON g.group_name = pa.group_name
JOIN pgcg.topics AS t ON t.name = g.topic
LEFT JOIN pgcg.group_lag(%(group)s) AS gl ON gl.partition = pa.partition
LEFT JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gl.position_tick
LEFT JOIN LATERAL (
    SELECT count(*) AS parked,
           count(*) FILTER (WHERE q.claimed_epoch = pa.epoch) AS running
    FROM pgcg.parked AS q WHERE q.group_id = g.id AND q.partition = pa.partition
) AS pk ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS n FROM (
        SELECT o FROM pgcg.ledger AS l, unnest(l.offsets) AS o
        WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
          AND l.group_id = g.id AND l.partition = pa.partition AND l.tick > gl.position_tick
          AND l.kind = 'm' AND l.gen = g.seek_gen AND l.epoch = pa.epoch
        EXCEPT
        SELECT o FROM pgcg.ledger AS l, unnest(coalesce(l.offsets, ARRAY[l."offset"])) AS o
        WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
          AND l.group_id = g.id AND l.partition = pa.partition AND l.tick > gl.position_tick
          AND l.kind = 'd' AND l.gen = g.seek_gen
    ) AS started
) AS fl ON pa.member_id IS NOT NULL
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
ORDER BY pa.partition

-- name: dead_letters
SELECT count(*) AS dead FROM pgcg.dead_letters WHERE group_name = %(group)s

-- name: losses
-- Messages the group lost to the topic's hard retention limit.
SELECT coalesce(sum(gl.lost), 0)::bigint AS lost, max(gl.at) AS last_at
FROM pgcg.group_losses AS gl JOIN pgcg.groups AS g ON g.id = gl.group_id
WHERE g.group_name = %(group)s

-- name: recent_rebalances
SELECT generation, leader_epoch, reason, members, moves, started_at, duration_ms
FROM pgcg.rebalances WHERE group_name = %(group)s
ORDER BY generation DESC LIMIT %(limit)s

-- name: in_flight_progress
-- Handlers running right now that reported progress (consumer/progress.py; a handler that
-- reports progress runs as a parked delivery): who runs each, how far it got, and whether
-- it is overdue (no report within the visibility timeout: its consumer cancels it as stuck
-- and retries it). Only deliveries under the partition's current owner and epoch count.
-- `now` pins the clock in tests; null: now().
SELECT pk.partition, pk."offset" * 1024 + pk.partition AS message_id, pk.key,
       pk.claimed_by AS member_id, pk.claimed_epoch AS epoch, pk.attempts AS attempt,
       (pk.progress ->> 'percent')::float8 AS percent, pk.progress ->> 'text' AS text,
       (pk.progress ->> 'at')::timestamptz AS reported_at, pk.locked_until,
       extract(epoch FROM c.now - (pk.progress ->> 'at')::timestamptz)::float8 AS reported_age_s,
       extract(epoch FROM pk.locked_until - c.now)::float8 AS deadline_in_s,
       pk.locked_until < c.now AS overdue
FROM (SELECT coalesce(%(now)s::timestamptz, now()) AS now) AS c
CROSS JOIN pgcg.groups AS g
JOIN pgcg.partition_assignments AS pa ON pa.group_name = g.group_name AND pa.topic = g.topic
JOIN pgcg.parked AS pk
  ON pk.group_id = g.id AND pk.partition = pa.partition
 AND pk.claimed_by = pa.member_id AND pk.claimed_epoch = pa.epoch
WHERE g.group_name = %(group)s AND pk.progress IS NOT NULL
ORDER BY pk.partition, pk.id

-- name: topics
-- Each topic's settings, its groups and the segment producers write into now.
SELECT t.name, t.id, t.partitions, t.segments, t.retention_ms, t.retention_bytes,
       t.hard_retention_ms, t.hard_retention_bytes, t.segment_bytes,
       coalesce(pg_sequence_last_value(t.segment_seq), 0) AS current_segment,
       ARRAY(SELECT g.group_name FROM pgcg.groups AS g WHERE g.topic = t.name
             ORDER BY g.group_name) AS groups
FROM pgcg.topics AS t
WHERE %(topic)s::text IS NULL OR t.name = %(topic)s
ORDER BY t.name

-- name: segments
-- The topic's segments still on disk and the last few reclaimed ones. `bytes`: the size of
-- its slot table (pgcg.log_<topic>_<k>, k = seq mod segments) while the segment lives there.
-- `due_in_s`: seconds until the retention time lets it go (negative: due).
SELECT s.seq, (s.seq %% t.segments)::integer AS slot,
       CASE WHEN s.reclaimed_at IS NOT NULL THEN 'reclaimed'
            WHEN s.seq > %(current)s THEN 'next'
            WHEN s.seq = %(current)s THEN 'current'
            WHEN s.sealed_at IS NULL THEN 'sealing'
            ELSE 'sealed' END AS state,
       CASE WHEN s.reclaimed_at IS NULL THEN pg_total_relation_size(
           ('pgcg.' || quote_ident('log_' || t.name || '_' || (s.seq %% t.segments)))::regclass)
       END AS bytes,
       s.created_at, s.sealed_at, s.reclaimed_at,
       CASE WHEN s.reclaimed_at IS NULL AND s.sealed_at IS NOT NULL THEN extract(epoch FROM
           s.sealed_at + t.retention_ms * interval '1 millisecond' - now())::float8
       END AS due_in_s,
       -- Upkeep reclaims a sealed segment only once a tick taken after its seal exists
       -- (every row it will ever have is visible there); consumers' reads take ticks.
       s.sealed_tick IS NOT NULL OR EXISTS (
           SELECT FROM pgcg.ticks AS k
           WHERE k.topic_id = t.id AND pg_snapshot_xmax(k.snapshot) > s.seal_xid) AS ticked
FROM pgcg.topics AS t JOIN pgcg.segments AS s ON s.topic_id = t.id
WHERE t.name = %(topic)s
  AND (s.reclaimed_at IS NULL OR s.seq > (
      SELECT max(r.seq) - %(reclaimed)s FROM pgcg.segments AS r
      WHERE r.topic_id = t.id AND r.reclaimed_at IS NOT NULL))
ORDER BY s.seq

-- name: held
-- What keeps the oldest sealed segment on disk: per group and partition that still has a
-- message in it after its position, as pgcg.maintain's 'held' check decides (read only,
-- and an existence probe instead of a count). Rows of transactions still running at the
-- position's tick are looked for only when there were any.
WITH s AS (
    SELECT sg.*, t.name AS topic, t.segments,
           coalesce(sg.sealed_tick, (
               SELECT min(k.tick) FROM pgcg.ticks AS k
               WHERE k.topic_id = t.id AND pg_snapshot_xmax(k.snapshot) > sg.seal_xid)) AS st
    FROM pgcg.topics AS t JOIN pgcg.segments AS sg ON sg.topic_id = t.id
    WHERE t.name = %(topic)s AND sg.seq = %(seq)s
)
SELECT g.group_name, gp.partition, coalesce(gl.lag, 0) AS lag
FROM s
JOIN pgcg.groups AS g ON g.topic = s.topic
JOIN pgcg.group_progress AS gp ON gp.group_id = g.id
JOIN pgcg.ticks AS k ON k.topic_id = s.topic_id AND k.tick = gp.tick
LEFT JOIN LATERAL pgcg.group_lag(g.group_name) AS gl ON gl.partition = gp.partition
WHERE (s.st IS NULL OR gp.tick < s.st)
  AND (EXISTS (
           SELECT FROM pgcg.log AS l
           WHERE l.slot = pgcg.slot_of(s.topic_id, s.seq, s.segments)
             AND l.partition = gp.partition AND l."offset" > k.offsets[gp.partition + 1])
       OR EXISTS (
           SELECT FROM pgcg.log AS l
           WHERE l.slot = pgcg.slot_of(s.topic_id, s.seq, s.segments)
             AND l.partition = gp.partition AND l."offset" <= k.offsets[gp.partition + 1]
             AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)))
ORDER BY g.group_name, gp.partition

-- name: producers
-- Transactions that still hold a segment's slot open for writing (a producer's enqueue
-- takes a shared advisory lock on it): sealing waits for them.
SELECT l.pid, a.application_name,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_s
FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = pgcg.slot_lock()::oid
  AND l.objid = (SELECT pgcg.slot_of(t.id, %(seq)s, t.segments)
                 FROM pgcg.topics AS t WHERE t.name = %(topic)s)::oid
ORDER BY a.xact_start NULLS LAST
