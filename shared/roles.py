"""`pgcg roles`: the grants and bindings that give each kind of pgcg process exactly what it
needs, as a script to review or run (docs/security.md, "Roles and grants").

- producer: EXECUTE on the producer's functions, bound to the topics it may write;
- consumer: EXECUTE on the consumer's functions, bound to the groups it may act for and the
  topic they read; no privilege on any table;
- coordinator: EXECUTE on the coordinator's functions (election, expiry, rebalances, topic
  upkeep), bound to every group for the lag metrics, and pg_signal_backend to depose a
  silent leader of another role; no privilege on any table;
- admin: EXECUTE on the functions of `pgcg status`, `dlq`, `group` and `topic`, bound to
  every group (creating groups, their lag); no privilege on any table, and the bindings
  stay the owner's to change;
- migrator: CREATE on the database, to run `pgcg migrate` and own what it creates.

A role that does not exist yet is created without LOGIN: grant it to the login roles that
should act as it, or `ALTER ROLE ... LOGIN`. Running the script again changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgcg.shared import grants, names
from pgcg.shared.db import translated
from pgcg.shared.errors import InvalidInput, InvalidName, SchemaNotMigrated
from pgcg.shared.queries import Queries

Q = Queries("roles")
KINDS = ("producer", "consumer", "coordinator", "admin", "migrator")
ANY = "*"
# Roles are named on the command line and end up in GRANT statements (quoted, but a name a
# user would have to quote everywhere else is refused up front).
_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def role_name(name: str) -> str:
    if not isinstance(name, str) or not _ROLE.fullmatch(name) or name.startswith("pg_"):
        raise InvalidName(
            f"invalid role name {name!r}: use 1-63 lowercase letters, digits and underscores, "
            "starting with a letter or underscore, not pg_"
        )
    return name


@dataclass(frozen=True)
class Statement:
    """One statement of the script: the text to show, and what to execute."""

    text: str
    query: sql.Composable | str
    params: dict[str, Any] | None = None


def _scope(name: str, check: Any) -> str:
    return name if name == ANY else check(name)


def plan(
    conn: psycopg.Connection[Any],
    kind: str,
    role: str,
    *,
    topics: Sequence[str] = (),
    groups: Sequence[str] = (),
) -> list[Statement]:
    """The statements that make `role` a `kind` of pgcg process."""
    role = role_name(role)
    if kind not in KINDS:
        raise InvalidInput(f"unknown kind of role {kind!r}: choose from {', '.join(KINDS)}")
    topics = [_scope(t, names.topic_name) for t in topics]
    groups = [_scope(g, names.group_name) for g in groups]
    if kind == "producer" and not topics:
        raise InvalidInput("a producer role needs the topics it may write: --topic (or '*')")
    if kind == "consumer" and (len(topics) != 1 or not groups):
        raise InvalidInput(
            "a consumer role needs its groups and the one topic they read: --group ... "
            "--topic (either may be '*')"
        )
    if kind not in ("producer", "consumer") and (topics or groups):
        raise InvalidInput(f"a {kind} role acts for every topic and group: drop --topic/--group")
    with translated():
        context = conn.execute(Q.context).fetchone()
        if context is None:
            raise SchemaNotMigrated("the pgcg schema is missing: run `pgcg migrate` first")
        present = conn.execute(Q.role_exists, {"role": role}).fetchone()
    ctx = context
    who = sql.Identifier(role)
    out: list[Statement] = []

    def add(query: sql.Composable) -> None:
        out.append(Statement(query.as_string(conn), query))

    def bind(scope: str, name: str, topic: str = ANY) -> None:
        params = {"kind": scope, "name": name, "role": role, "topic": topic}
        text = psycopg.ClientCursor(conn).mogrify(Q.bind, params)
        out.append(Statement(" ".join(text.split()), Q.bind, params))

    if not (present and present["present"]):
        add(sql.SQL("CREATE ROLE {}").format(who))
    if kind == "migrator":
        add(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(ctx["database"]), who))  # fmt: skip
        return [Statement(s.text + ";", s.query, s.params) for s in out]
    add(sql.SQL("GRANT USAGE ON SCHEMA pgcg TO {}").format(who))
    functions = grants.FUNCTIONS[kind]
    add(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
        sql.SQL(", ").join(sql.Identifier("pgcg", f) for f in functions), who))  # fmt: skip
    if kind == "producer":
        for topic in topics:
            bind("topic", topic)
    elif kind == "consumer":
        for group in groups:
            bind("group", group, topics[0])
    else:
        # Before schema version 5 these kinds held table privileges (and the owner's
        # default privileges gave them each new topic's tables): running the script again
        # after an upgrade takes those away.
        owner = sql.Identifier(ctx["owner"])
        add(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA pgcg FROM {}").format(who))
        add(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgcg FROM {}").format(who))
        for objects in (sql.SQL("TABLES"), sql.SQL("SEQUENCES")):
            add(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA pgcg "
                        "REVOKE ALL ON {} FROM {}").format(owner, objects, who))  # fmt: skip
        if kind == "coordinator":
            # Deposing a silent leader whose session runs as another role.
            add(sql.SQL("GRANT pg_signal_backend TO {}").format(who))
        # group_lag (metrics, `pgcg group list`) and create_group check the binding.
        bind("group", ANY)
    return [Statement(s.text + ";", s.query, s.params) for s in out]


def apply(conn: psycopg.Connection[Any], statements: Sequence[Statement]) -> None:
    """Run the statements in one transaction: all of them or none."""
    with translated(), conn.transaction():
        for s in statements:
            conn.execute(s.query, s.params)
