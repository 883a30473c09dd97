-- Statements of shared/producer.py.

-- name: enqueue
-- Payloads travel as JSON text and are cast once on the server; ids come back in input order.
-- The arrays go in binary (the `b` placeholders): in text format psycopg quotes and
-- regex-escapes every JSON payload on the client, which took 40 percent of a producer's CPU.
SELECT ord, id, partition
FROM pgcg.enqueue(
    %(topic)s,
    %(keys)b::text[],
    %(payloads)b::text[]::jsonb[],
    %(headers)b::text[]::jsonb[],
    %(dedup_keys)b::text[],
    %(delays_ms)b::bigint[]
)

-- name: create_topic
SELECT pgcg.create_topic(%(name)s, %(partitions)s) AS created

-- name: topic_partitions
SELECT partitions FROM pgcg.topics WHERE name = %(name)s
