-- Statements of bench/probe.py and bench/rebalance.py: what `pgcg bench rebalance` reads to
-- time a group's reactions, and the set-up and clean-up of its own groups and topics.
-- Every timestamp read here is the database's; the probe converts it to this host's clock.

-- name: clock
SELECT clock_timestamp() AS now

-- name: members
SELECT member_id, pid, joined_at, last_heartbeat
FROM pgcg.consumer_groups WHERE group_name = %(group)s
ORDER BY joined_at, member_id

-- name: assignments
SELECT partition, member_id, epoch, state, assigned_at
FROM pgcg.partition_assignments WHERE group_name = %(group)s
ORDER BY partition

-- name: leader
SELECT leader_epoch, leader_id, elected_at,
       heartbeat_at > now() - %(leader_timeout_s)s * interval '1 second' AS fresh
FROM pgcg.coordinator_leader WHERE scope = %(group)s

-- name: generation
SELECT coalesce(max(generation), 0) AS generation
FROM pgcg.rebalances WHERE group_name = %(group)s

-- name: first_rebalance_of_new_leader
SELECT generation, leader_epoch, reason, started_at, duration_ms
FROM pgcg.rebalances
WHERE group_name = %(group)s AND leader_epoch > %(leader_epoch)s
ORDER BY generation
LIMIT 1

-- name: first_move_away
-- The first rebalance after `generation` that took a partition from `member` (its expiry).
SELECT generation, reason, started_at
FROM pgcg.rebalances
WHERE group_name = %(group)s AND generation > %(generation)s
  AND moves @> jsonb_build_array(jsonb_build_object('from_member', %(member)s::text))
ORDER BY generation
LIMIT 1

-- name: backlog
-- What the group has not finished, counted as bench.sql's `unfinished` does (enqueued
-- offsets less the group's completions, plus its parked messages), without reading the
-- log; before the group exists, everything enqueued.
SELECT (SELECT coalesce(sum(o.v + 1), 0) FROM unnest(pgcg.topic_offsets(t.offset_seqs)) AS o(v))
       - coalesce((SELECT count(*) FROM (
              SELECT DISTINCT d.partition, x.v
              FROM pgcg.ledger AS d, unnest(coalesce(d.offsets, ARRAY[d."offset"])) AS x(v)
              WHERE d.slot BETWEEN t.id * 64 AND t.id * 64 + 63
                AND d.group_id = g.id AND d.kind = 'd' AND d.gen = g.seek_gen) AS f), 0)
       + coalesce((SELECT count(*) FROM pgcg.parked AS pk WHERE pk.group_id = g.id), 0)
       AS pending
FROM pgcg.topics AS t
LEFT JOIN pgcg.groups AS g ON g.topic = t.name AND g.group_name = %(group)s
WHERE t.name = %(topic)s

-- name: journal_mark
SELECT coalesce(max(id), 0) AS id FROM public.pgcg_journal

-- name: first_handled
-- Per (partition, member, epoch): when the recording handler first finished a message,
-- among journal rows written after `after`.
SELECT partition, member_id, epoch, min(finished_at) AS finished_at
FROM public.pgcg_journal
WHERE id > %(after)s AND member_id = ANY(%(members)s::text[])
GROUP BY partition, member_id, epoch

-- name: reset_group
-- The in-process cost bench starts every repeat from an empty group.
WITH gone AS (
    DELETE FROM pgcg.consumer_groups WHERE group_name = %(group)s RETURNING 1
)
UPDATE pgcg.partition_assignments
SET member_id = NULL, state = 'unassigned', epoch = epoch + 1, target_member_id = NULL,
    revoke_deadline = NULL, assigned_at = NULL
WHERE group_name = %(group)s

-- name: drop_rebalances
DELETE FROM pgcg.rebalances WHERE group_name = %(group)s

-- name: drop_assignments
DELETE FROM pgcg.partition_assignments WHERE group_name = %(group)s

-- name: drop_members
DELETE FROM pgcg.consumer_groups WHERE group_name = %(group)s

-- name: drop_leader
DELETE FROM pgcg.coordinator_leader WHERE scope = %(group)s
