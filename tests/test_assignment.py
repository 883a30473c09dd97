"""Assignment transitions (consumer/assignment.py), without a database."""

from __future__ import annotations

from pgcg.consumer.assignment import Assignment
from pgcg.consumer.member import AssignmentRow
from pgcg.consumer.scheduler import KeyScheduler


def test_unrevoked_partition_adopts_the_rows_it_dropped() -> None:
    """Revoking drops a partition's buffered messages, whose rows stay claimed under the
    epoch. If the leader then changes its mind, the claim skips rows claimed under the
    current epoch, so unless the partition adopts them again they are invisible and the
    key's later messages overtake them (found by `pgcg chaos`, seed 7)."""
    assignment = Assignment(KeyScheduler(), dict, margin=1.0)
    assignment.apply([AssignmentRow(7, 6, "assigned", None)])
    assignment.owned[7].adopted = True  # the fetcher adopted and claimed under epoch 6
    assignment.apply([AssignmentRow(7, 6, "revoking", 3.0)])
    changes = assignment.apply([AssignmentRow(7, 6, "assigned", None)])
    assert changes.resumed and assignment.owned[7].state == "assigned"
    assert not assignment.owned[7].adopted


def test_log_fields_follow_a_rejoin() -> None:
    """The member id in partition logs is the current one, not the one at startup."""
    fields = {"member_id": "host-1-aaaa"}
    assignment = Assignment(KeyScheduler(), lambda: dict(fields), margin=1.0)
    fields["member_id"] = "host-1-bbbb"  # rejoined under a new id
    assert assignment.fields["member_id"] == "host-1-bbbb"
