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
SELECT name, partitions, segments FROM pgcg.topic_settings(%(name)s)

-- name: list
-- Every topic with its retention, its groups and what its log takes on disk now.
SELECT name, partitions, segments, retention_ms, retention_bytes, hard_retention_ms,
       hard_retention_bytes, segment_bytes, dedup_window_ms, groups, stored_bytes
FROM pgcg.list_topics()
