-- Statements behind the metrics (consumer/observer.py, coordinator/observer.py). Read-only,
-- and run on their own connection every few seconds, never on a scrape.

-- name: partition_lag
-- Messages not yet acked (waiting, claimed, or waiting for a retry) and the age of the
-- oldest, per partition of the topic: all of them, or those in %(partitions)s. Partitions
-- with nothing waiting report 0 and 0. Ages are on the database clock only.
SELECT p.partition, count(m.id) AS messages,
       coalesce(extract(epoch FROM now() - min(m.enqueued_at)), 0)::float8 AS oldest_s
FROM pgcg.topics AS t
CROSS JOIN LATERAL generate_series(0, t.partitions - 1) AS p(partition)
LEFT JOIN pgcg.messages AS m
       ON m.topic = t.name AND m.partition = p.partition
      AND (%(partitions)s::int[] IS NULL OR m.partition = ANY(%(partitions)s::int[]))
WHERE t.name = %(topic)s
  AND (%(partitions)s::int[] IS NULL OR p.partition = ANY(%(partitions)s::int[]))
GROUP BY p.partition
ORDER BY p.partition
