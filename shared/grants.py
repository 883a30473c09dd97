"""What each kind of pgcg process needs on each of pgcg's tables, for the one-line error a
missing privilege gives (shared/db.py) and for docs/security.md, which lists the same.

PostgreSQL's "permission denied for table X" does not say which privilege the statement
wanted, and the same table serves several processes with different needs: the error names
the grants each process needs there, as statements to run.

A topic's own tables (`log_<topic>`, its slots `log_<topic>_<n>`, `ledger_<topic>_<n>`)
are created by `pgcg topic create`, so grants made before that do not cover them.
"""

from __future__ import annotations

import re

# table -> ((process, privileges), ...); every process also needs USAGE on schema pgcg.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    # Coordinators read the first waiting message for the lag's age.
    "log": (
        ("producers and `pgcg dlq replay`", "INSERT"),
        ("consumers", "SELECT"),
        ("coordinators", "SELECT"),
    ),
    # The topic's reader reads its log table directly; maintenance counts and truncates
    # the slots.
    "log_<topic>": (("consumers", "SELECT"),),
    "log_<topic>_<n>": (("coordinators", "SELECT, TRUNCATE"),),
    "ledger": (("consumers", "SELECT, INSERT"),),
    "ledger_<topic>_<n>": (("coordinators", "TRUNCATE"),),
    "parked": (("consumers", "SELECT, INSERT, UPDATE, DELETE"),),
    "group_progress": (("consumers", "SELECT, INSERT, UPDATE"), ("coordinators", "SELECT, UPDATE")),
    "ticks": (("consumers", "SELECT, INSERT"), ("coordinators", "SELECT, DELETE")),
    "segments": (("consumers", "SELECT"), ("coordinators", "SELECT, INSERT, UPDATE, DELETE")),
    "group_losses": (("coordinators", "INSERT"),),
    "dead_letters": (("consumers", "INSERT"), ("`pgcg dlq`", "SELECT, DELETE")),
    "dedup": (("producers", "SELECT, INSERT, UPDATE"), ("coordinators", "SELECT, DELETE")),
    "topics": (("producers", "SELECT"), ("consumers", "SELECT"), ("coordinators", "SELECT")),
    # A consumer creates its group when it joins one that does not exist yet.
    "groups": (("consumers", "SELECT, INSERT"), ("coordinators", "SELECT, UPDATE")),
    "consumer_groups": (
        ("consumers", "SELECT, INSERT, UPDATE, DELETE"),
        ("coordinators", "SELECT, DELETE"),
    ),
    "partition_assignments": (
        ("consumers", "SELECT, INSERT, UPDATE"),
        ("coordinators", "SELECT, UPDATE"),
    ),
    "coordinator_leader": (("coordinators", "SELECT, INSERT, UPDATE"),),
    "rebalances": (("coordinators", "INSERT"),),
}

_SLOT = re.compile(r"^(log|ledger)_.+_[0-9]+$")
_TOPIC_LOG = re.compile(r"^log_.+$")


def _family(table: str) -> str | None:
    if table in NEEDS:
        return table
    if _SLOT.match(table):
        return f"{table.split('_', 1)[0]}_<topic>_<n>"
    if _TOPIC_LOG.match(table):
        return "log_<topic>"
    return None


def advice(table: str) -> str | None:
    """The grants pgcg's processes need on `table`, as statements; None for a table that
    is not pgcg's."""
    family = _family(table)
    if family is None:
        return None
    clauses = [f"{who} GRANT {privileges} ON pgcg.{table}" for who, privileges in NEEDS[family]]
    return "what pgcg needs there: " + "; ".join(clauses)
