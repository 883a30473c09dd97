-- Statements of the coordinator (coordinator/elector.py, rebalancer.py).
--
-- Every write the leader makes runs in a transaction that first locks its own leader row
-- with `lock_leadership`: a deposed leader finds no row and writes nothing, and a
-- standby's takeover waits until an in-flight rebalance has committed.

-- name: ensure_leader_row
INSERT INTO pgcg.coordinator_leader (scope) VALUES (%(scope)s) ON CONFLICT DO NOTHING

-- name: try_lock
SELECT pg_try_advisory_lock(%(lock_class)s, hashtext(%(scope)s)) AS locked

-- name: unlock
SELECT pg_advisory_unlock(%(lock_class)s, hashtext(%(scope)s)) AS unlocked

-- name: take_leadership
UPDATE pgcg.coordinator_leader
SET leader_epoch = leader_epoch + 1, leader_id = %(leader)s, backend_pid = pg_backend_pid(),
    heartbeat_at = now(), elected_at = now()
WHERE scope = %(scope)s
RETURNING leader_epoch

-- name: leader_heartbeat
-- Renew only while still within the leader timeout: a leader that was paused past it
-- must step down even if nobody has deposed it yet.
UPDATE pgcg.coordinator_leader SET heartbeat_at = now()
WHERE scope = %(scope)s AND leader_epoch = %(leader_epoch)s AND leader_id = %(leader)s
  AND heartbeat_at > now() - %(leader_timeout_s)s * interval '1 second'
RETURNING leader_epoch

-- name: lock_leadership
SELECT leader_epoch FROM pgcg.coordinator_leader
WHERE scope = %(scope)s AND leader_epoch = %(leader_epoch)s AND leader_id = %(leader)s
  AND heartbeat_at > now() - %(leader_timeout_s)s * interval '1 second'
FOR UPDATE

-- name: stale_leader
-- A leader whose heartbeat is older than the timeout (paused, or its host partitioned):
-- its backend is terminated so the advisory lock frees up.
SELECT backend_pid, leader_id, leader_epoch,
       extract(epoch FROM now() - heartbeat_at)::float8 AS silent_s
FROM pgcg.coordinator_leader
WHERE scope = %(scope)s AND backend_pid IS NOT NULL
  AND heartbeat_at < now() - %(leader_timeout_s)s * interval '1 second'

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

-- name: leader_of
SELECT leader_epoch, leader_id, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS silent_s
FROM pgcg.coordinator_leader WHERE scope = %(scope)s

-- name: groups
SELECT group_name, topic FROM pgcg.groups ORDER BY group_name

-- name: member_heartbeats
-- Each member's last heartbeat as a value to watch, not a time to compare with now(): the
-- coordinator times silences on its own clock (coordinator/expiry.py), so a step of the
-- database host's clock expires nobody whose lease is still valid.
SELECT group_name, member_id, last_heartbeat, session_timeout_ms
FROM pgcg.consumer_groups
WHERE group_name = ANY(%(groups)s::text[])

-- name: expire_members
-- Only members whose heartbeat is still the one the coordinator saw go silent: one that
-- heartbeated since is kept.
DELETE FROM pgcg.consumer_groups AS cg
USING unnest(%(members)s::text[], %(heartbeats)s::timestamptz[]) AS x(member_id, last_heartbeat)
WHERE cg.group_name = %(group)s AND cg.member_id = x.member_id
  AND cg.last_heartbeat = x.last_heartbeat
RETURNING cg.member_id

-- name: live_members
SELECT member_id, host, pid FROM pgcg.consumer_groups
WHERE group_name = %(group)s ORDER BY joined_at, member_id

-- name: bound_lock_waits
-- How long any one lock wait of this rebalance may last (a lock timeout aborts it, and the
-- coordinator retries): a heartbeat reads the assignments without a lock, so until this
-- transaction commits owners keep seeing (and renewing their lease on) the old state.
SELECT set_config('lock_timeout', %(lock_timeout_ms)s::int::text, true)

-- name: assignments_for_update
-- `overdue` is judged on the clock once the rows are locked (the outer query runs after
-- the lock waits), not at the start of the transaction.
SELECT partition, member_id, epoch, state, target_member_id,
       revoke_deadline IS NOT NULL AND revoke_deadline <= clock_timestamp() AS overdue
FROM (
    SELECT partition, member_id, epoch, state, target_member_id, revoke_deadline
    FROM pgcg.partition_assignments
    WHERE group_name = %(group)s AND topic = %(topic)s
    ORDER BY partition
    FOR UPDATE
) AS locked
ORDER BY partition

-- name: assign
-- Give partitions to a member outright with a new epoch: unowned ones, ones whose owner
-- died, and forced hand-offs whose drain deadline passed.
UPDATE pgcg.partition_assignments AS pa
SET member_id = a.member_id, state = 'assigned', epoch = pa.epoch + 1,
    target_member_id = NULL, revoke_deadline = NULL, assigned_at = now()
FROM unnest(%(partitions)s::int[], %(members)s::text[]) AS a(partition, member_id)
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.partition = a.partition
RETURNING pa.partition, pa.epoch, pa.member_id

-- name: revoke
-- Ask live owners to drain and release; the epoch stays until they do (or the deadline).
-- The deadline is never sooner than the owner's own session timeout: an owner cut off
-- before it heard of this keeps working until its lease (counted from a heartbeat sent
-- before now) runs out, and a forced hand-off before that would give its keys to a
-- second member while it still works on them, whatever drain deadline the leader has.
-- Counted from now, with the rows locked (clock_timestamp()), not from the start of the
-- transaction (now()): an owner's heartbeat during this transaction's lock waits still saw
-- `assigned` and renewed its lease from then.
UPDATE pgcg.partition_assignments AS pa
SET state = 'revoking', target_member_id = a.target,
    revoke_deadline = coalesce(
        pa.revoke_deadline,
        clock_timestamp() + greatest(
            %(drain_deadline_s)s * interval '1 second',
            (SELECT cg.session_timeout_ms * interval '1 millisecond'
             FROM pgcg.consumer_groups AS cg
             WHERE cg.group_name = pa.group_name AND cg.member_id = pa.member_id)))
FROM unnest(%(partitions)s::int[], %(targets)s::text[]) AS a(partition, target)
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.partition = a.partition
RETURNING pa.partition

-- name: unrevoke
-- The leader changed its mind (the target left): the owner keeps the partition.
UPDATE pgcg.partition_assignments AS pa
SET state = 'assigned', target_member_id = NULL, revoke_deadline = NULL
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.partition = ANY(%(partitions)s)
RETURNING pa.partition

-- name: unassign
-- Owners that are gone and nobody to take over (no live members).
UPDATE pgcg.partition_assignments AS pa
SET member_id = NULL, state = 'unassigned', epoch = pa.epoch + 1,
    target_member_id = NULL, revoke_deadline = NULL
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.partition = ANY(%(partitions)s)
RETURNING pa.partition

-- name: next_generation
UPDATE pgcg.groups SET generation = generation + 1
WHERE group_name = %(group)s RETURNING generation

-- name: record_rebalance
INSERT INTO pgcg.rebalances
    (group_name, generation, leader_epoch, reason, members, moves, started_at, duration_ms)
VALUES (%(group)s, %(generation)s, %(leader_epoch)s, %(reason)s, %(members)s, %(moves)s,
        %(started_at)s, %(duration_ms)s)

-- name: notify_group
SELECT pg_notify('pgcg.g.' || %(group)s::text, 'assignment')

-- name: topics
SELECT name FROM pgcg.topics ORDER BY name

-- name: maintain
-- One round of a topic's retention upkeep (rotation, sealing, reclaiming, trimming); one
-- caller at a time per topic, the others return nothing.
SELECT event, seq, group_name, partition, n FROM pgcg.maintain(%(topic)s)
