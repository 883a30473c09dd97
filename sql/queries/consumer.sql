-- Statements of the consumer (consumer/member.py, assignment.py, reader.py, writer.py,
-- progress.py, transactional.py). Every one is a call of a function of sql/migrations that
-- checks the role is bound to the group (0004_definer.sql) and runs as the schema's owner: a
-- consumer's role holds no privilege on any table. Everything that acts on a partition is
-- fenced by the partition's epoch (pgcg.owned).

-- name: topic_partitions
SELECT partitions FROM pgcg.topic_partitions(%(topic)s)

-- name: create_group
-- A group joined before it was created starts at the earliest retained message.
SELECT pgcg.create_group(%(group)s, %(topic)s, 'earliest') AS created

-- name: join
SELECT pgcg.join_group(%(group)s, %(member)s, %(host)s, %(pid)s, %(session_timeout_ms)s)

-- name: notify_coordinator
SELECT pg_notify('pgcg.coordinator', json_build_object(
    'group', %(group)s::text, 'event', %(event)s::text, 'member', %(member)s::text)::text)

-- name: heartbeat
-- The heartbeat and the member's view of its assignments in one round trip. `alive` is
-- false once the coordinator expelled us: stop everything and rejoin.
SELECT alive, partition, epoch, state, revoke_in FROM pgcg.heartbeat(%(group)s, %(member)s)

-- name: heartbeat_members
-- The heartbeat of every member of one process in one round trip (consumer/heartbeat.py).
SELECT group_name AS "group", member_id AS member, alive, partition, epoch, state, revoke_in
FROM pgcg.heartbeat_members(%(groups)s::text[], %(members)s::text[])

-- name: heartbeat_members_expecting
-- heartbeat_members, and on each row what the group expects of that member, for its
-- readiness (consumer/readiness.py), in the same round trip: asked once per live member.
WITH beat AS MATERIALIZED (
    SELECT * FROM pgcg.heartbeat_members(%(groups)s::text[], %(members)s::text[])
), expected AS (
    SELECT m.group_name, m.member_id, e.partitions, e.members, e.assigned, e.incoming
    FROM (SELECT DISTINCT b.group_name, b.member_id FROM beat AS b WHERE b.alive) AS m
    CROSS JOIN LATERAL pgcg.member_expectation(m.group_name, m.member_id) AS e
)
SELECT b.group_name AS "group", b.member_id AS member, b.alive, b.partition, b.epoch, b.state,
       b.revoke_in, x.partitions AS e_partitions, x.members AS e_members,
       x.assigned AS e_assigned, x.incoming AS e_incoming
FROM beat AS b
LEFT JOIN expected AS x ON x.group_name = b.group_name AND x.member_id = b.member_id
ORDER BY b.group_name, b.member_id, b.partition

-- name: leave
SELECT pgcg.leave_group(%(group)s, %(member)s)

-- name: adopt
SELECT tick, gen, finished, charged, buried
FROM pgcg.adopt(%(group)s, %(member)s, %(partition)s, %(epoch)s, %(max_attempts)s,
                %(retry_delay_ms)s)

-- name: fetch
SELECT partition, state, a_tick, tick, "offset", slot, key, payload,
       nullif(headers, '{}'::jsonb) AS headers, enqueued_at, due_in_ms, bytes
FROM pgcg.fetch(%(group)s, %(partitions)s::int[], %(done)s::bigint[], %(cur)s::bigint[],
                %(cur_offsets)s::bigint[], %(limit)s, %(limit_bytes)s)

-- name: load_parked
SELECT id, partition, tick, "offset", key, payload, nullif(headers, '{}'::jsonb) AS headers,
       enqueued_at, attempts, due_in_ms, origin, bytes
FROM pgcg.load_parked(%(group)s, %(partitions)s::int[], %(held)s::bigint[], %(lookahead_ms)s,
                      %(limit)s, %(followers)s, '{}'::text[], '{}'::bigint[], '{}'::int[])

-- name: next_parked
-- In how many ms the first parked message of these partitions can be loaded (NULL: none),
-- for an idle reader's wait (consumer/reader.py).
SELECT due_in_ms FROM pgcg.next_parked(%(group)s, %(partitions)s::int[])

-- name: settle
SELECT what, partition, ref, ok, info
FROM pgcg.settle(
    %(group)b, %(member)b,
    %(m_parts)b::int[], %(m_epochs)b::bigint[], %(m_ticks)b::bigint[], %(m_offsets)b::bigint[],
    %(m_slots)b::int[],
    %(c_ids)b::bigint[], %(c_parts)b::int[], %(c_epochs)b::bigint[], %(c_tokens)b::text[],
    %(visibility_ms)b,
    %(l_kinds)b::"char"[], %(l_parts)b::int[], %(l_epochs)b::bigint[], %(l_ticks)b::bigint[],
    %(l_offsets)b::bigint[], %(l_slots)b::int[], %(l_attempts)b::int[], %(l_delays)b::bigint[],
    %(l_errors)b::text[], %(l_origins)b::text[], %(l_claimed)b::boolean[],
    %(k_kinds)b::"char"[], %(k_ids)b::bigint[], %(k_parts)b::int[], %(k_epochs)b::bigint[],
    %(k_delays)b::bigint[], %(k_errors)b::text[])

-- name: save_position
SELECT partition FROM pgcg.save_position(%(group)s, %(member)s, %(partitions)s::int[],
                                         %(epochs)s::bigint[], %(ticks)s::bigint[])

-- name: release
SELECT partition, epoch, new_owner, old_epoch
FROM pgcg.release(%(group)s, %(member)s, %(partitions)s::int[], %(epochs)s::bigint[],
                  %(ticks)s::bigint[], %(clean)s::boolean[], %(revoked_only)s)

-- name: report_progress
SELECT partition, epoch
FROM pgcg.report_progress(%(group)s, %(member)s, %(ids)s::bigint[], %(partitions)s::int[],
                          %(epochs)s::bigint[], %(percents)s::float8[], %(texts)s::text[],
                          %(visibility_ms)s)

-- name: tx_begin
-- The first statement of a transactional handler's transaction (sent with BEGIN in one
-- round trip, see consumer/transactional.py): a token local to this transaction, so the
-- completion can tell that the handler did not end it, and whether we still own the
-- partition. No lock here: it is taken by tx_complete, so a long handler never holds up a
-- hand-off.
SELECT set_config('pgcg.tx_token', %(token)s, true) AS token,
       pgcg.owns(%(group)s, %(topic)s, %(partition)s, %(member)s, %(epoch)s) AS owned

-- name: tx_complete
-- The completion of a transactional handler, in its own transaction right before COMMIT
-- (see pgcg.tx_complete). `intact` is false when the transaction is not the one tx_begin
-- opened (the handler committed and began another).
SELECT coalesce(current_setting('pgcg.tx_token', true) = %(token)s, false) AS intact,
       c.owned, c.completed, c.parked_left
FROM pgcg.tx_complete(%(group)s, %(member)s, %(partition)s, %(epoch)s, %(tick)s, %(offset)s,
                      %(slot)s, %(parked_id)s) AS c

-- name: end_abandoned
-- The writer's server process of a connection it gave up on (no answer within its bound,
-- or the connection failed while a round was on it): ended, and waited for, before a
-- round is written again. Still running, its statement could commit after the one made
-- again, and a late retry or park would undo what later rounds wrote. Only a process of
-- this role and of a writer is ended; no row: it is gone already. `ended` false: still
-- there after the wait.
SELECT pg_terminate_backend(a.pid, %(wait_ms)s) AS ended
FROM pg_stat_activity AS a
WHERE a.pid = %(pid)s AND a.usename = current_user AND a.application_name = 'pgcg-writer'
