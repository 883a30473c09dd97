-- Statements of shared/public/testing.py (run_until_processed, for users' integration tests).

-- name: unfinished
-- Messages the group still has to handle or dead-letter: log messages after its position
-- with no completion in its ledger, plus its parked ones (waiting for a retry). Counted
-- exactly, not from the ticks' offsets: a test waits for this to reach 0.
SELECT (
    SELECT count(*) FROM pgcg.log AS l
    JOIN pgcg.group_progress AS gp ON gp.group_id = g.id AND gp.partition = l.partition
    JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
    WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
      AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)
      AND (l.only_group IS NULL OR l.only_group = g.id)
      AND NOT EXISTS (
          SELECT FROM pgcg.ledger AS d
          WHERE d.group_id = g.id AND d.partition = l.partition AND d.kind = 'd'
            AND d.gen = g.seek_gen AND l."offset" = ANY (coalesce(d.offsets, ARRAY[d."offset"])))
) + (SELECT count(*) FROM pgcg.parked AS pk WHERE pk.group_id = g.id) AS n
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
WHERE g.group_name = %(group)s
