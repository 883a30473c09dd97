-- Statements of shared/dlq.py. Filters are optional: a null parameter matches everything.
-- Dead letters are per group: each group dead-letters its own failures.

-- name: list
SELECT id, message_id, group_name, topic, partition, "offset", key, payload, headers,
       dedup_key, attempts, last_error, reason, member_id, enqueued_at, dead_at
FROM pgcg.dead_letters
WHERE (%(group)s::text IS NULL OR group_name = %(group)s)
  AND (%(topic)s::text IS NULL OR topic = %(topic)s)
  AND (%(key)s::text IS NULL OR key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR dead_at < %(until)s)
ORDER BY id
LIMIT %(limit)s

-- name: pick
-- The dead letters of one group to replay, locked until the replay commits.
SELECT id, message_id FROM pgcg.dead_letters
WHERE group_name = %(group)s
  AND (%(topic)s::text IS NULL OR topic = %(topic)s)
  AND (%(key)s::text IS NULL OR key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR dead_at < %(until)s)
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED

-- name: replay
-- Each dead letter goes back at the end of its topic's log for its group only (other
-- groups skip it), bypassing the dedup window and keeping its dedup key; the dead letter
-- is removed. A replayed message is handled after the messages of its key enqueued before
-- the replay. Returns the dead letter's row id and the message's new id.
SELECT dead_letter, id, partition FROM pgcg.replay_dead_letters(%(group)s, %(ids)s)

-- name: purge
DELETE FROM pgcg.dead_letters
WHERE (%(group)s::text IS NULL OR group_name = %(group)s)
  AND (%(topic)s::text IS NULL OR topic = %(topic)s)
  AND (%(key)s::text IS NULL OR key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR dead_at < %(until)s)
RETURNING id
