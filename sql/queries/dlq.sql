-- Statements of shared/dlq.py. Filters are optional: a null parameter matches everything.
-- Dead letters are per group: each group dead-letters its own failures.

-- name: list
SELECT id, message_id, group_name, topic, partition, "offset", key, payload, headers,
       dedup_key, attempts, last_error, reason, member_id, enqueued_at, dead_at
FROM pgcg.list_dead_letters(%(group)s::text, %(topic)s::text, %(key)s::text,
                            %(since)s::timestamptz, %(until)s::timestamptz, %(limit)s::bigint)

-- name: pick
-- The dead letters of one group to replay, locked until the replay commits.
SELECT id, message_id
FROM pgcg.pick_dead_letters(%(group)s::text, %(topic)s::text, %(key)s::text,
                            %(since)s::timestamptz, %(until)s::timestamptz, %(limit)s::bigint)

-- name: replay
-- Each dead letter goes back at the end of its topic's log for its group only (other
-- groups skip it), bypassing the dedup window and keeping its dedup key; the dead letter
-- is removed. A replayed message is handled after the messages of its key enqueued before
-- the replay. Returns the dead letter's row id and the message's new id.
SELECT dead_letter, id, partition FROM pgcg.replay_dead_letters(%(group)s, %(ids)s)

-- name: purge
SELECT id
FROM pgcg.purge_dead_letters(%(group)s::text, %(topic)s::text, %(key)s::text,
                             %(since)s::timestamptz, %(until)s::timestamptz)
