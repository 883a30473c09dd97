-- A copy of the named query group_lag_total in sql/queries/status.sql: Helm can
-- only read files inside the chart. tests/test_helm.py fails if the two differ.
-- The chart drops these comment lines and puts the group name, as a quoted
-- literal, in place of the parameter.
SELECT count(*) AS lag
FROM pgcg.messages AS m
JOIN pgcg.subscriptions AS s ON s.topic = m.topic
WHERE s.group_name = %(group)s
