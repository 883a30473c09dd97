-- Statements of shared/producer.py.

-- name: enqueue
-- Payloads travel as JSON text and are cast once on the server; ids come back in input order.
SELECT ord, id, partition
FROM pgcg.enqueue(
    %(topic)s,
    %(keys)s::text[],
    %(payloads)s::text[]::jsonb[],
    %(headers)s::text[]::jsonb[],
    %(dedup_keys)s::text[],
    %(delays_ms)s::bigint[]
)

-- name: create_topic
SELECT pgcg.create_topic(%(name)s, %(partitions)s) AS created

-- name: topic_partitions
SELECT partitions FROM pgcg.topics WHERE name = %(name)s
