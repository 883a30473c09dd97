-- Statements behind a consumer's readiness (consumer/readiness.py). Read-only and small:
-- a few index lookups on the group's assignment and member rows, every heartbeat interval.

-- name: member_expectation
-- What the group expects of one member: how many partitions it has and how many live
-- members share them (the assignor gives each at least partitions / members), which
-- partitions are assigned to this member, and which are on their way to it (revoking
-- from another owner with this member as the target). "Live" is what the coordinator's
-- expiry uses: a heartbeat within the member's own session timeout.
SELECT partitions, members, assigned, incoming
FROM pgcg.member_expectation(%(group)s, %(member)s)
