-- Statements of shared/topics.py: creating, changing and listing topics.

-- name: create
SELECT pgcg.create_topic(%(name)s, %(partitions)s, %(segments)s) AS created

-- name: alter
-- A null leaves a setting as it is; 0 clears a hard limit or the size retention.
SELECT name, partitions, segments, retention_ms, retention_bytes, hard_retention_ms,
       hard_retention_bytes, segment_bytes, dedup_window_ms
FROM pgcg.alter_topic(%(name)s, p_retention_ms => %(retention_ms)s,
                      p_retention_bytes => %(retention_bytes)s,
                      p_hard_retention_ms => %(hard_retention_ms)s,
                      p_hard_retention_bytes => %(hard_retention_bytes)s,
                      p_segment_bytes => %(segment_bytes)s,
                      p_dedup_window_ms => %(dedup_window_ms)s)

-- name: get
SELECT name, partitions, segments FROM pgcg.topics WHERE name = %(name)s

-- name: list
-- Every topic with its retention, its groups and what its log takes on disk now.
SELECT t.name, t.partitions, t.segments, t.retention_ms, t.retention_bytes,
       t.hard_retention_ms, t.hard_retention_bytes, t.segment_bytes, t.dedup_window_ms,
       (SELECT count(*) FROM pgcg.groups AS g WHERE g.topic = t.name) AS groups,
       (SELECT coalesce(sum(pg_total_relation_size(pt.relid)), 0)
        FROM pg_partition_tree(('pgcg.' || quote_ident('log_' || t.name))::regclass) AS pt
       )::bigint AS stored_bytes
FROM pgcg.topics AS t
ORDER BY t.name
