"""What each kind of pgcg process needs: the functions it calls (EXECUTE). `pgcg roles`
(shared/roles.py) grants these; the one-line error a missing privilege gives (shared/db.py)
and docs/security.md list the same.

No process holds a privilege on any table: every statement that reads or writes one calls a
function that runs as the schema's owner (SECURITY DEFINER, EXECUTE revoked from PUBLIC).
Producers' and consumers' functions first check the role is bound to the topic or group it
names (sql/migrations/0004_definer.sql); coordinators and the administrative commands act
for every group and topic, so EXECUTE is their permission (sql/migrations/0005).
"""

from __future__ import annotations

import re

# The functions each runtime role calls.
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
    "next_parked",
    "settle",
    "report_progress",
    "save_position",
    "release",
    "tx_complete",
    "group_lag",
)
COORDINATOR_FUNCTIONS: tuple[str, ...] = (
    # Election (coordinator/elector.py).
    "ensure_leader_row",
    "take_leadership",
    "leader_heartbeat",
    "stale_leader",
    # Member expiry and rebalances (coordinator/service.py, rebalancer.py).
    "group_topics",
    "member_heartbeats",
    "lock_leadership",
    "expire_members",
    "live_members",
    "assignments_for_update",
    "assign_partitions",
    "revoke_partitions",
    "unrevoke_partitions",
    "unassign_partitions",
    "next_generation",
    "record_rebalance",
    # Topic upkeep (coordinator/retention.py).
    "topic_names",
    "maintain",
    # Lag metrics (coordinator/observer.py): checked, the role is bound to every group.
    "group_lag",
)
# `pgcg status`, `pgcg dlq`, `pgcg group` and `pgcg topic`.
ADMIN_FUNCTIONS: tuple[str, ...] = (
    # status (schema_version: it refuses to run on an older schema)
    "schema_version",
    "status_groups",
    "status_leader",
    "status_members",
    "status_partitions",
    "status_losses",
    "recent_rebalances",
    "in_flight_progress",
    "status_topics",
    "status_segments",
    "segment_holders",
    "segment_slot",
    "dead_letter_count",
    # dlq
    "list_dead_letters",
    "pick_dead_letters",
    "replay_dead_letters",
    "purge_dead_letters",
    # group (create_group and group_lag are checked: the role is bound to every group)
    "create_group",
    "group_topic",
    "list_groups",
    "delete_group",
    "seek_group",
    "group_lag",
    # topic
    "create_topic",
    "alter_topic",
    "topic_settings",
    "list_topics",
)

FUNCTIONS: dict[str, tuple[str, ...]] = {
    "producer": PRODUCER_FUNCTIONS,
    "consumer": CONSUMER_FUNCTIONS,
    "coordinator": COORDINATOR_FUNCTIONS,
    "admin": ADMIN_FUNCTIONS,
}


# pgcg's own tables, and those `pgcg topic create` makes for each topic (`log_<topic>`, its
# slots `log_<topic>_<n>`, `ledger_<topic>_<n>`).
TABLES = frozenset({
    "consumer_groups", "coordinator_leader", "dead_letters", "dedup", "group_losses",
    "group_progress", "groups", "ledger", "log", "parked", "partition_assignments",
    "rebalances", "role_scopes", "schema_migrations", "segments", "ticks", "topics",
})  # fmt: skip
_TOPIC_TABLE = re.compile(r"^(log|ledger)_.+$")


def kinds_calling(function: str) -> list[str]:
    """The kinds of process (`pgcg roles` kinds) that call `function`."""
    return [kind for kind, functions in FUNCTIONS.items() if function in functions]


def advice(kind: str, name: str) -> str | None:
    """How to grant what a process lacks on pgcg's object `name` of `kind` (the word
    PostgreSQL's message uses), as one clause; None for an object that is not pgcg's."""
    if kind == "function":
        kinds = kinds_calling(name)
        if not kinds:
            return None
        how = " or ".join(f"`pgcg roles {k} <role>`" for k in kinds)
        return f"grant it with {how} (docs/security.md lists what each needs)"
    if kind == "table" and (name in TABLES or _TOPIC_TABLE.match(name)):
        return (
            "no pgcg process needs a privilege on a table: each calls functions of the "
            "schema, granted with `pgcg roles` (a process of an older pgcg: upgrade it, "
            "docs/security.md)"
        )
    return None
