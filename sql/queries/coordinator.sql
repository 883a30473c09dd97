-- Statements of the coordinator (coordinator/elector.py, rebalancer.py, retention.py).
-- Each one that reads or writes a table calls a function of sql/migrations/0005 (the
-- coordinator's role holds EXECUTE on those and no table privilege); the functions are
-- these statements as they were, so what is said here of their locks and clocks holds.
--
-- Every write the leader makes runs in a transaction that first locks its own leader row
-- with `lock_leadership`: a deposed leader finds no row and writes nothing, and a
-- standby's takeover waits until an in-flight rebalance has committed.

-- name: ensure_leader_row
SELECT pgcg.ensure_leader_row(%(scope)s)

-- name: try_lock
SELECT pg_try_advisory_lock(%(lock_class)s, hashtext(%(scope)s)) AS locked

-- name: unlock
SELECT pg_advisory_unlock(%(lock_class)s, hashtext(%(scope)s)) AS unlocked

-- name: take_leadership
SELECT leader_epoch FROM pgcg.take_leadership(%(scope)s, %(leader)s)

-- name: leader_heartbeat
-- Renew only while still within the leader timeout: a leader that was paused past it
-- must step down even if nobody has deposed it yet.
SELECT leader_epoch
FROM pgcg.leader_heartbeat(%(scope)s, %(leader_epoch)s::bigint, %(leader)s,
                           %(leader_timeout_s)s::float8)

-- name: lock_leadership
SELECT leader_epoch
FROM pgcg.lock_leadership(%(scope)s, %(leader_epoch)s::bigint, %(leader)s,
                          %(leader_timeout_s)s::float8)

-- name: stale_leader
-- A leader whose heartbeat is older than the timeout (paused, or its host partitioned):
-- its backend is terminated so the advisory lock frees up.
SELECT backend_pid, leader_id, leader_epoch, silent_s
FROM pgcg.stale_leader(%(scope)s, %(leader_timeout_s)s::float8)

-- name: terminate_leader_backend
-- Only a backend that really holds this group's leader lock: the pid in the leader row is
-- whatever was last written there, and whoever can write that row could otherwise aim a
-- standby at any backend. No row: the pid holds no such lock, nothing was terminated.
-- Waits up to wait_ms for the backend to exit, and its advisory locks with it (PostgreSQL
-- 14+, which the schema already needs); false if it did not exit in time.
SELECT pg_terminate_backend(l.pid, %(wait_ms)s::bigint) AS terminated
FROM pg_locks AS l
WHERE l.locktype = 'advisory' AND l.granted AND l.pid = %(pid)s::int
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(lock_class)s::int::oid
  AND l.objid = hashtext(%(scope)s)::oid
  AND l.objsubid = 2

-- name: groups
SELECT group_name, topic FROM pgcg.group_topics()

-- name: member_heartbeats
-- Each member's last heartbeat as a value to watch, not a time to compare with now(): the
-- coordinator times silences on its own clock (coordinator/expiry.py), so a step of the
-- database host's clock expires nobody whose lease is still valid.
SELECT group_name, member_id, last_heartbeat, session_timeout_ms
FROM pgcg.member_heartbeats(%(groups)s::text[])

-- name: expire_members
-- Only members whose heartbeat is still the one the coordinator saw go silent: one that
-- heartbeated since is kept.
SELECT member_id
FROM pgcg.expire_members(%(group)s, %(members)s::text[], %(heartbeats)s::timestamptz[])

-- name: live_members
SELECT member_id, host, pid FROM pgcg.live_members(%(group)s)

-- name: bound_lock_waits
-- How long any one lock wait of this rebalance may last (a lock timeout aborts it, and the
-- coordinator retries): a heartbeat reads the assignments without a lock, so until this
-- transaction commits owners keep seeing (and renewing their lease on) the old state.
-- The same bound holds between statements: a leader paused mid-rebalance (SIGSTOP, a
-- stalled host) would otherwise commit a revocation long after its drain deadline began;
-- the server ends such a transaction instead, and nothing it wrote lands.
SELECT set_config('lock_timeout', %(lock_timeout_ms)s::int::text, true),
       set_config('idle_in_transaction_session_timeout', %(idle_timeout_ms)s::int::text, true)

-- name: assignments_for_update
-- `overdue` is judged on the clock once the rows are locked (the outer query runs after
-- the lock waits), not at the start of the transaction. It is the database's half of the
-- drain deadline: the leader forces a hand-off only once the drain has run its course on
-- its own monotonic clock as well (coordinator/drains.py), as the database's clock can step.
SELECT partition, member_id, epoch, state, target_member_id, overdue
FROM pgcg.assignments_for_update(%(group)s, %(topic)s)

-- name: assign
-- Give partitions to a member outright with a new epoch: unowned ones, ones whose owner
-- died, and forced hand-offs whose drain deadline passed.
SELECT partition, epoch, member_id
FROM pgcg.assign_partitions(%(group)s, %(topic)s, %(partitions)s::int[], %(members)s::text[])

-- name: revoke
-- Ask live owners to drain and release; the epoch stays until they do (or the deadline).
-- The deadline is never sooner than the owner's own session timeout: an owner cut off
-- before it heard of this keeps working until its lease (counted from a heartbeat sent
-- before now) runs out, and a forced hand-off before that would give its keys to a
-- second member while it still works on them, whatever drain deadline the leader has.
-- Counted from now, with the rows locked (clock_timestamp()), not from the start of the
-- transaction (now()): an owner's heartbeat during this transaction's lock waits still saw
-- `assigned` and renewed its lease from then.
SELECT partition
FROM pgcg.revoke_partitions(%(group)s, %(topic)s, %(partitions)s::int[], %(targets)s::text[],
                            %(drain_deadline_s)s::float8)

-- name: unrevoke
-- The leader changed its mind (the target left): the owner keeps the partition.
SELECT partition FROM pgcg.unrevoke_partitions(%(group)s, %(topic)s, %(partitions)s::int[])

-- name: unassign
-- Owners that are gone and nobody to take over (no live members).
SELECT partition FROM pgcg.unassign_partitions(%(group)s, %(topic)s, %(partitions)s::int[])

-- name: next_generation
SELECT generation FROM pgcg.next_generation(%(group)s)

-- name: record_rebalance
SELECT pgcg.record_rebalance(%(group)s, %(generation)s::bigint, %(leader_epoch)s::bigint,
                             %(reason)s, %(members)s::int, %(moves)s::jsonb,
                             %(started_at)s::timestamptz,
                             %(duration_ms)s::float8)

-- name: notify_group
SELECT pg_notify('pgcg.g.' || %(group)s::text, 'assignment')

-- name: topics
SELECT name FROM pgcg.topic_names()

-- name: maintain
-- One round of a topic's retention upkeep (rotation, sealing, reclaiming, trimming); one
-- caller at a time per topic, the others return nothing.
SELECT event, seq, group_name, partition, n FROM pgcg.maintain(%(topic)s)
