-- Statements of shared/groups.py: creating, listing, deleting and moving groups.

-- name: create
SELECT pgcg.create_group(%(group)s, %(topic)s, %(from)s) AS created

-- name: topic_of
SELECT topic FROM pgcg.group_topic(%(group)s)

-- name: list
-- Lag from the ticks' offsets (pgcg.group_lag), never by counting messages; the oldest
-- age as in status.sql's partitions (the first message after the position: one probe).
SELECT group_name, topic, created_at, members, lag, oldest_age_s, parked
FROM pgcg.list_groups(%(topic)s::text)

-- name: delete
SELECT pgcg.delete_group(%(group)s, %(force)s) AS deleted

-- name: dead_letters
SELECT pgcg.dead_letter_count(%(group)s) AS n

-- name: seek
-- Fenced in the database: every assignment row of the group locked and its epoch bumped,
-- so running owners drop their partitions and adopt them again at the new position.
SELECT s.partition, s.tick, s.dropped
FROM pgcg.seek_group(%(group)s, %(to)s) AS s
ORDER BY s.partition

-- name: lag
SELECT gl.partition, gl.lag FROM pgcg.group_lag(%(group)s) AS gl ORDER BY gl.partition
