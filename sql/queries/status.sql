-- name: group_lag_total
-- The one number KEDA scales consumers on and `pgcg status` shows as total lag:
-- messages of the group's topic not yet acked. Helm renders it with the group
-- name as a quoted literal in place of the parameter.
SELECT count(*) AS lag
FROM pgcg.messages AS m
JOIN pgcg.subscriptions AS s ON s.topic = m.topic
WHERE s.group_name = %(group)s
