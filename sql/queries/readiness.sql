-- Statements behind a consumer's readiness (consumer/readiness.py). Read-only and small:
-- a few index lookups on the group's assignment and member rows, every heartbeat interval.

-- name: member_expectation
-- What the group expects of one member: how many partitions it has and how many live
-- members share them (the assignor gives each at least partitions / members), which
-- partitions are assigned to this member, and which are on their way to it (revoking
-- from another owner with this member as the target). "Live" is what the coordinator's
-- expiry uses: a heartbeat within the member's own session timeout.
SELECT
    (SELECT count(*) FROM pgcg.partition_assignments AS pa
     WHERE pa.group_name = %(group)s) AS partitions,
    (SELECT count(*) FROM pgcg.consumer_groups AS cg
     WHERE cg.group_name = %(group)s
       AND cg.last_heartbeat >= now() - cg.session_timeout_ms * interval '1 millisecond')
        AS members,
    coalesce((SELECT array_agg(pa.partition ORDER BY pa.partition)
              FROM pgcg.partition_assignments AS pa
              WHERE pa.group_name = %(group)s AND pa.member_id = %(member)s
                AND pa.state = 'assigned'), '{}') AS assigned,
    coalesce((SELECT array_agg(pa.partition ORDER BY pa.partition)
              FROM pgcg.partition_assignments AS pa
              WHERE pa.group_name = %(group)s AND pa.target_member_id = %(member)s
                AND pa.member_id IS DISTINCT FROM %(member)s), '{}') AS incoming
