-- Statements of shared/dlq.py. Filters are optional: a null parameter matches everything.

-- name: list
SELECT id, message_id, topic, partition, key, payload, headers, attempts, last_error,
       group_name, member_id, enqueued_at, dead_at
FROM pgcg.dead_letters
WHERE (%(topic)s::text IS NULL OR topic = %(topic)s)
  AND (%(key)s::text IS NULL OR key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR dead_at < %(until)s)
ORDER BY id
LIMIT %(limit)s

-- name: replay
-- Back into the queue under the message's original id: ids grow with enqueue order, so
-- the replayed message sorts before every newer pending message of its key and is
-- handled first. Attempts start over.
WITH picked AS (
    DELETE FROM pgcg.dead_letters AS d
    WHERE d.id IN (
        SELECT id FROM pgcg.dead_letters
        WHERE (%(topic)s::text IS NULL OR topic = %(topic)s)
          AND (%(key)s::text IS NULL OR key = %(key)s)
          AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s)
          AND (%(until)s::timestamptz IS NULL OR dead_at < %(until)s)
        ORDER BY id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING d.*
), replayed AS (
    INSERT INTO pgcg.messages AS m (id, topic, partition, key, payload, headers, enqueued_at)
    SELECT message_id, topic, partition, key, payload, headers, enqueued_at FROM picked
    RETURNING m.id, m.topic, m.partition
), notified AS (
    SELECT pg_notify('pgcg.t.' || topic, string_agg(DISTINCT partition::text, ','))
    FROM replayed GROUP BY topic
)
SELECT r.id, r.topic, r.partition, (SELECT count(*) FROM notified) AS topics
FROM replayed AS r ORDER BY r.id

-- name: purge
DELETE FROM pgcg.dead_letters
WHERE (%(topic)s::text IS NULL OR topic = %(topic)s)
  AND (%(key)s::text IS NULL OR key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR dead_at < %(until)s)
RETURNING id
