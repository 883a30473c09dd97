"""What each kind of pgcg process needs: the functions it calls (EXECUTE), for producers and
consumers, and, for coordinators and the administrative commands, the privileges on each of
pgcg's tables. `pgcg roles` (shared/roles.py) grants these; the one-line error a missing
privilege gives (shared/db.py) and docs/security.md list the same.

Producers and consumers hold no privilege on any table: every statement they send calls a
function that runs as the schema's owner after checking the role is bound to the topic or
group it names (sql/migrations/0004_definer.sql). Coordinators and the administrative
commands still read and write the tables with their own privileges.

PostgreSQL's "permission denied for table X" does not say which privilege the statement
wanted, and the same table serves several processes with different needs: the error names
the grants each process needs there, as statements to run.

A topic's own tables (`log_<topic>`, its slots `log_<topic>_<n>`, `ledger_<topic>_<n>`)
are created by `pgcg topic create`, so grants made before that do not cover them.
"""

from __future__ import annotations

import re

# The functions each runtime role calls. All SECURITY DEFINER, EXECUTE revoked from PUBLIC;
# each checks the caller's binding (pgcg.role_scopes) first.
PRODUCER_FUNCTIONS: tuple[str, ...] = ("enqueue", "topic_partitions")
CONSUMER_FUNCTIONS: tuple[str, ...] = (
    "topic_partitions",
    "create_group",
    "join_group",
    "heartbeat",
    "heartbeat_members",
    "leave_group",
    "member_expectation",
    "owns",
    "adopt",
    "fetch",
    "load_parked",
    "settle",
    "report_progress",
    "save_position",
    "release",
    "tx_complete",
    "group_lag",
)
# Its metrics read each group's lag.
COORDINATOR_FUNCTIONS: tuple[str, ...] = ("group_lag",)
ADMIN_FUNCTIONS: tuple[str, ...] = ("create_topic", "create_group", "group_lag")

# table -> ((process, privileges), ...) for the processes that still use the tables directly;
# they also need USAGE on schema pgcg.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    # Coordinators read the first waiting message for the lag's age.
    "log": (("`pgcg dlq replay`", "INSERT"), ("coordinators", "SELECT")),
    # Maintenance counts and truncates the slots.
    "log_<topic>_<n>": (("coordinators", "SELECT, TRUNCATE"),),
    "ledger_<topic>_<n>": (("coordinators", "TRUNCATE"),),
    "group_progress": (("coordinators", "SELECT, UPDATE"),),
    "ticks": (("coordinators", "SELECT, DELETE"),),
    "segments": (("coordinators", "SELECT, INSERT, UPDATE, DELETE"),),
    "group_losses": (("coordinators", "INSERT"),),
    "dead_letters": (("`pgcg dlq`", "SELECT, DELETE"),),
    "dedup": (("coordinators", "SELECT, DELETE"),),
    "topics": (("coordinators", "SELECT"),),
    "groups": (("coordinators", "SELECT, UPDATE"),),
    "consumer_groups": (("coordinators", "SELECT, DELETE"),),
    "partition_assignments": (("coordinators", "SELECT, UPDATE"),),
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
    if family is None or family not in NEEDS:
        return None
    clauses = [f"{who} GRANT {privileges} ON pgcg.{table}" for who, privileges in NEEDS[family]]
    return "what pgcg needs there: " + "; ".join(clauses)
