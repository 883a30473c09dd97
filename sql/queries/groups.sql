-- Statements of shared/groups.py: creating, listing, deleting and moving groups.

-- name: create
SELECT pgcg.create_group(%(group)s, %(topic)s, %(from)s) AS created

-- name: topic_of
SELECT topic FROM pgcg.groups WHERE group_name = %(group)s

-- name: list
-- Lag from the ticks' offsets (pgcg.group_lag), never by counting messages; the oldest
-- age as in status.sql's partitions (the first message after the position: one probe).
SELECT g.group_name, g.topic, g.created_at,
       (SELECT count(*) FROM pgcg.consumer_groups AS cg
        WHERE cg.group_name = g.group_name) AS members,
       coalesce(l.lag, 0)::bigint AS lag, l.oldest_age_s,
       (SELECT count(*) FROM pgcg.parked AS pk WHERE pk.group_id = g.id) AS parked
FROM pgcg.groups AS g
JOIN pgcg.topics AS t ON t.name = g.topic
LEFT JOIN LATERAL (
    SELECT sum(gl.lag) AS lag,
           max(CASE WHEN gl.lag > 0 THEN greatest(0, gl.age_s, (
               SELECT extract(epoch FROM now() - lg.enqueued_at)::float8
               FROM pgcg.log AS lg
               WHERE lg.slot BETWEEN t.id * 64 AND t.id * 64 + 63
                 AND lg.partition = gl.partition
                 AND lg."offset" > coalesce(k.offsets[gl.partition + 1], -1)
               ORDER BY lg."offset" LIMIT 1)) END) AS oldest_age_s
    FROM pgcg.group_lag(g.group_name) AS gl
    LEFT JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gl.position_tick
) AS l ON true
WHERE %(topic)s::text IS NULL OR g.topic = %(topic)s
ORDER BY g.group_name

-- name: delete
SELECT pgcg.delete_group(%(group)s, %(force)s) AS deleted

-- name: dead_letters
SELECT count(*) AS n FROM pgcg.dead_letters WHERE group_name = %(group)s

-- name: seek
-- Fenced in the database: every assignment row of the group locked and its epoch bumped,
-- so running owners drop their partitions and adopt them again at the new position.
SELECT s.partition, s.tick, s.dropped
FROM pgcg.seek_group(%(group)s, %(to)s) AS s
ORDER BY s.partition

-- name: lag
SELECT gl.partition, gl.lag FROM pgcg.group_lag(%(group)s) AS gl ORDER BY gl.partition
