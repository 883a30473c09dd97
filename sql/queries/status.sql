-- name: group_lag_total
-- The one number KEDA scales consumers on and `pgcg status` shows as total lag:
-- messages of the group's topic not yet acked. Helm renders it with the group
-- name as a quoted literal in place of the parameter.
SELECT count(*) AS lag
FROM pgcg.messages AS m
JOIN pgcg.subscriptions AS s ON s.topic = m.topic
WHERE s.group_name = %(group)s

-- name: in_flight_progress
-- Messages in a handler right now that reported progress (consumer/progress.py): who runs
-- each, how far it got, and whether it is overdue (no report within the visibility
-- timeout: its consumer cancels it as stuck and retries it). Only deliveries under the
-- partition's current owner and epoch count. `now` pins the clock in tests; null: now().
SELECT m.partition, m.id AS message_id, m.key, m.claimed_by AS member_id,
       m.claim_epoch AS epoch, m.attempts + 1 AS attempt,
       (m.progress ->> 'percent')::float8 AS percent, m.progress ->> 'text' AS text,
       (m.progress ->> 'at')::timestamptz AS reported_at, m.locked_until,
       extract(epoch FROM c.now - (m.progress ->> 'at')::timestamptz)::float8 AS reported_age_s,
       extract(epoch FROM m.locked_until - c.now)::float8 AS deadline_in_s,
       m.locked_until < c.now AS overdue
FROM (SELECT coalesce(%(now)s::timestamptz, now()) AS now) AS c
CROSS JOIN pgcg.subscriptions AS s
JOIN pgcg.partition_assignments AS pa ON pa.group_name = s.group_name AND pa.topic = s.topic
JOIN pgcg.messages AS m
  ON m.topic = s.topic AND m.partition = pa.partition
 AND m.claimed_by = pa.member_id AND m.claim_epoch = pa.epoch
WHERE s.group_name = %(group)s AND m.progress IS NOT NULL
ORDER BY m.partition, m.id
