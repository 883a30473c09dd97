-- Statements behind the metrics (consumer/observer.py, coordinator/observer.py). Read-only,
-- and run on their own connection every few seconds, never on a scrape.

-- name: group_lag
-- Per partition of a group: messages enqueued after its position (no counting: the
-- partition's last offset minus the one recorded at the position) and how long ago the
-- first of them became visible.
SELECT partition, lag, age_s FROM pgcg.group_lag(%(group)s)
