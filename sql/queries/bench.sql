-- Statements of bench/database.py and the benchmarks that drain a topic: how far each
-- group is, and the clean-up of the topics and groups a run made up.

-- name: unfinished
-- Per group of the topic: messages it has not finished, without reading the log, so a
-- bench can poll it while consumers drain. Enqueued is every partition's last offset + 1
-- (offsets are dense unless an enqueue rolled back, which a bench never does); finished is
-- the distinct offsets in the group's completion rows (a result written twice counts
-- once), less those moved to the parked queue and still there. Completion rows stay until
-- their segment is reclaimed, which retention keeps far beyond a bench run.
SELECT g.group_name,
       (SELECT coalesce(sum(o.v + 1), 0) FROM unnest(pgcg.topic_offsets(t.offset_seqs)) AS o(v))
       - (SELECT count(*) FROM (
              SELECT DISTINCT d.partition, x.v
              FROM pgcg.ledger AS d, unnest(coalesce(d.offsets, ARRAY[d."offset"])) AS x(v)
              WHERE d.slot BETWEEN t.id * 64 AND t.id * 64 + 63
                AND d.group_id = g.id AND d.kind = 'd' AND d.gen = g.seek_gen) AS f)
       + (SELECT count(*) FROM pgcg.parked AS pk WHERE pk.group_id = g.id) AS unfinished
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
WHERE g.topic = %(topic)s
ORDER BY g.group_name

-- name: stored
-- Messages the topic's log holds, whatever any group did with them.
SELECT (SELECT coalesce(sum(o.v + 1), 0) FROM unnest(pgcg.topic_offsets(t.offset_seqs)) AS o(v))
       AS stored
FROM pgcg.topics AS t WHERE t.name = %(topic)s

-- name: topic_groups
SELECT group_name FROM pgcg.groups WHERE topic = %(topic)s ORDER BY group_name

-- name: drop_group
-- The group with its position, parked messages, members, assignments and leadership
-- (pgcg.delete_group, forced: the bench stopped its consumers), and its recorded rebalances.
WITH gone AS (
    DELETE FROM pgcg.rebalances WHERE group_name = %(group)s RETURNING 1
)
SELECT pgcg.delete_group(%(group)s, true) AS deleted

-- name: topic_relations
-- What pgcg.create_topic built for the topic, by name (the name passed the topics' name
-- check): its log and ledger parents (their slot tables go with them), its sequences and
-- its reader function.
SELECT 'log_' || t.name AS log, 'ledger_' || t.name AS ledger, 'read_' || t.name AS reader,
       ARRAY(SELECT c.relname::text
             FROM unnest(t.offset_seqs || t.segment_seq) AS q(oid)
             JOIN pg_class AS c ON c.oid = q.oid) AS sequences
FROM pgcg.topics AS t WHERE t.name = %(topic)s

-- name: drop_dead_letters
DELETE FROM pgcg.dead_letters WHERE topic = %(topic)s

-- name: drop_topic_row
-- After the topic's relations are dropped; its ticks, segments and dedup digests go with
-- the row.
DELETE FROM pgcg.topics WHERE name = %(topic)s
