-- name: group_lag_total
-- The one number KEDA scales consumers on and `pgcg status` shows as total lag:
-- messages of the group's topic not yet acked. Helm renders it with the group
-- name as a quoted literal in place of the parameter.
SELECT count(*) AS lag
FROM pgcg.messages AS m
JOIN pgcg.subscriptions AS s ON s.topic = m.topic
WHERE s.group_name = %(group)s

-- name: groups
SELECT s.group_name, s.topic, s.generation, t.partitions
FROM pgcg.subscriptions AS s JOIN pgcg.topics AS t ON t.name = s.topic
WHERE %(group)s::text IS NULL OR s.group_name = %(group)s
ORDER BY s.group_name

-- name: leader
SELECT leader_id, leader_epoch,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s,
       extract(epoch FROM now() - heartbeat_at)::float8 < %(leader_timeout_s)s AS alive
FROM pgcg.coordinator_leader WHERE scope = %(group)s

-- name: members
SELECT member_id, host, pid, joined_at,
       extract(epoch FROM now() - last_heartbeat)::float8 AS heartbeat_age_s,
       session_timeout_ms / 1000.0 AS session_timeout_s
FROM pgcg.consumer_groups WHERE group_name = %(group)s
ORDER BY joined_at, member_id

-- name: partitions
-- Per partition: owner, epoch, state, and lag: messages not yet acked, how many of them a
-- member holds claimed, and the age of the oldest.
SELECT pa.partition, pa.member_id, pa.epoch, pa.state, pa.target_member_id,
       extract(epoch FROM pa.revoke_deadline - now())::float8 AS revoke_in_s,
       coalesce(l.lag, 0) AS lag, coalesce(l.in_flight, 0) AS in_flight, l.oldest_age_s
FROM pgcg.partition_assignments AS pa
LEFT JOIN (
    SELECT partition, count(*) AS lag,
           count(*) FILTER (WHERE claimed_by IS NOT NULL) AS in_flight,
           extract(epoch FROM now() - min(enqueued_at))::float8 AS oldest_age_s
    FROM pgcg.messages WHERE topic = %(topic)s GROUP BY partition
) AS l ON l.partition = pa.partition
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
ORDER BY pa.partition

-- name: dead_letters
SELECT count(*) AS dead FROM pgcg.dead_letters WHERE topic = %(topic)s

-- name: recent_rebalances
SELECT generation, leader_epoch, reason, members, moves, started_at, duration_ms
FROM pgcg.rebalances WHERE group_name = %(group)s
ORDER BY generation DESC LIMIT %(limit)s

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
