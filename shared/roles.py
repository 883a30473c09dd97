"""`pgcg roles`: the grants and bindings that give each kind of pgcg process exactly what it
needs, as a script to review or run (docs/security.md, "Roles and grants").

- producer: EXECUTE on the producer's functions, bound to the topics it may write;
- consumer: EXECUTE on the consumer's functions, bound to the groups it may act for and the
  topic they read; no privilege on any table;
- coordinator: the table privileges of shared/grants.py (also on the tables of topics
  created later, through the owner's default privileges), bound to every group for the lag
  metrics, and pg_signal_backend to depose a silent leader of another role;
- admin: what the administrative commands read and change (every table of the schema),
  creating topics and groups;
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
        existing = conn.execute(Q.topics).fetchall() if kind == "coordinator" else []
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
    functions = {
        "producer": grants.PRODUCER_FUNCTIONS,
        "consumer": grants.CONSUMER_FUNCTIONS,
        "coordinator": grants.COORDINATOR_FUNCTIONS,
        "admin": grants.ADMIN_FUNCTIONS,
    }[kind]
    add(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
        sql.SQL(", ").join(sql.Identifier("pgcg", f) for f in functions), who))  # fmt: skip
    if kind == "producer":
        for topic in topics:
            bind("topic", topic)
    elif kind == "consumer":
        for group in groups:
            bind("group", group, topics[0])
    elif kind == "coordinator":
        _coordinator_tables(add, who, existing, sql.Identifier(ctx["owner"]))
        add(sql.SQL("GRANT pg_signal_backend TO {}").format(who))
        bind("group", ANY)
    else:  # admin
        owner = sql.Identifier(ctx["owner"])
        add(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgcg TO {}")
            .format(who))  # fmt: skip
        # The bindings are the owner's to change: an admin could otherwise widen any role.
        add(sql.SQL("REVOKE INSERT, UPDATE, DELETE ON pgcg.role_scopes FROM {}").format(who))
        add(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgcg TO {}").format(who))
        add(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA pgcg "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}"
            ).format(owner, who)
        )
        add(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA pgcg "
                    "GRANT USAGE ON SEQUENCES TO {}").format(owner, who))  # fmt: skip
        bind("group", ANY)
    return [Statement(s.text + ";", s.query, s.params) for s in out]


def _coordinator_tables(add: Any, who: sql.Identifier, topics: list[Any],
                        owner: sql.Identifier) -> None:  # fmt: skip
    """The coordinator's table privileges (shared/grants.py), on each existing topic's own
    tables and sequences, and on those of topics created later."""
    by_privileges: dict[str, list[sql.Composable]] = {}
    for table, needs in grants.NEEDS.items():
        for who_needs, privileges in needs:
            if who_needs != "coordinators":
                continue
            if "<topic>" not in table:
                targets = [table]
            else:
                targets = [
                    table.replace("<topic>", t["name"]).replace("<n>", str(n))
                    for t in topics for n in range(t["segments"])
                ]  # fmt: skip
            by_privileges.setdefault(privileges, []).extend(
                sql.Identifier("pgcg", name) for name in targets
            )
    for privileges, tables in by_privileges.items():
        add(sql.SQL("GRANT {} ON TABLE {} TO {}").format(
            sql.SQL(privileges), sql.SQL(", ").join(tables), who))  # fmt: skip
    for t in topics:
        offsets = [sql.Identifier("pgcg", f"log_{t['name']}_p{p}") for p in range(t["partitions"])]
        add(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sql.SQL(", ").join(offsets), who))
        add(sql.SQL("GRANT USAGE, UPDATE ON SEQUENCE {} TO {}").format(
            sql.Identifier("pgcg", f"log_{t['name']}_segment"), who))  # fmt: skip
    add(
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA pgcg "
            "GRANT SELECT, TRUNCATE ON TABLES TO {}"
        ).format(owner, who)
    )
    add(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA pgcg "
                "GRANT USAGE, UPDATE ON SEQUENCES TO {}").format(owner, who))  # fmt: skip


def apply(conn: psycopg.Connection[Any], statements: Sequence[Statement]) -> None:
    """Run the statements in one transaction: all of them or none."""
    with translated(), conn.transaction():
        for s in statements:
            conn.execute(s.query, s.params)
