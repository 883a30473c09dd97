"""Plan assertions: a hot statement must stay index-driven at any batch size and backlog,
on every PostgreSQL the tests run on (the embedded 18, and 15 with PGCG_TEST_SERVER=15).

    plans = assert_index_driven(db, Q.ack, params)

runs the statement under EXPLAIN (ANALYZE, BUFFERS, VERBOSE, FORMAT JSON) in a transaction
that is rolled back (its writes, NOTIFYs and locks go with it), twice: once as psycopg
sends it unprepared (a custom plan for these values: what every execution gets through a
transaction pooler, and the first five get otherwise), and once as the generic plan a
prepared statement settles on (psycopg prepares a statement after five executions;
PostgreSQL may then switch to a plan made without the values). It fails, with the plan in
the message, when

  - a Seq Scan reads a relation with more than `large` rows (its statistics, or the rows
    it actually read when it has none) outside `allow_seq_scan`;
  - any scan reads more than `large` rows and throws them away (Rows Removed by Filter or
    by an index recheck, times its loops), or reads more than `large` rows and more than
    twice what the statement returns (or writes): an index that only narrows the search a
    little is a scan too;
  - a join discards more than `large` row pairs in its join filter;
  - any node spilled to disk: temporary blocks written, a Sort done on disk, a Hash in more
    than one batch, a HashAggregate that wrote to disk.

A test loads a backlog big enough to tell a scan from a lookup (several times `large` in the
relation the statement reads, then ANALYZE, as autovacuum would), and small `work_mem` if it
wants to see a spill early. Plans are measured, never timed. Returns the two plans (JSON of
EXPLAIN's top node) for further checks, e.g. `index_names(plans["generic"])`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import PyFormat, Transformer
from psycopg.rows import tuple_row

Plan = dict[str, Any]

MODES = ("custom", "generic")
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")
_STATEMENT = "pgcg_plan_check"


def assert_index_driven(
    conn: psycopg.Connection[Any],
    query: str,
    params: Mapping[str, Any] | Sequence[Any] = (),
    *,
    large: int = 1_000,
    allow_seq_scan: Sequence[str] = (),
    modes: Sequence[str] = MODES,
    settings: Mapping[str, str] | None = None,
) -> dict[str, Plan]:
    """Fail unless every plan of `query` in `modes` reads by index and stays in memory.

    `allow_seq_scan`: relation names (unqualified) whose sequential scans are fine however
    big they get, e.g. a table of one row per partition. `settings`: SET LOCAL for the
    check, e.g. {"work_mem": "64kB"}.
    """
    unknown = set(modes) - set(MODES)
    assert not unknown, f"unknown plan modes {unknown}; choose from {MODES}"
    plans = {mode: explain(conn, query, params, mode=mode, settings=settings) for mode in modes}
    problems = {
        mode: problems_in(conn, plan, large=large, allow_seq_scan=allow_seq_scan)
        for mode, plan in plans.items()
    }
    if any(problems.values()):
        text = [f"server {conn.info.server_version}: statement is not index-driven"]
        for mode, found in problems.items():
            if found:
                text.append(f"{mode} plan:")
                text.extend(f"  - {p}" for p in found)
                text.append(render(plans[mode], indent="    "))
        raise AssertionError("\n".join(text))
    return plans


def explain(
    conn: psycopg.Connection[Any],
    query: str,
    params: Mapping[str, Any] | Sequence[Any] = (),
    *,
    mode: str = "custom",
    settings: Mapping[str, str] | None = None,
) -> Plan:
    """The executed plan of `query` (top node), in a transaction rolled back afterwards."""
    options = "ANALYZE, BUFFERS, VERBOSE, TIMING OFF, FORMAT JSON"
    cur = conn.cursor(row_factory=tuple_row)
    try:
        with conn.transaction(force_rollback=True):
            for name, value in (settings or {}).items():
                cur.execute("SELECT set_config(%s, %s, true)", (name, value))
            if mode == "custom":
                cur.execute(f"EXPLAIN ({options}) {query}", params or None)
                return _top(cur.fetchone())
            text, values = _positional(query, params)
            cur.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            _prepare(conn, text, values)
            # EXECUTE's arguments as literals of the types the server settled on: a generic
            # plan does not look at them, and a utility statement cannot type parameters.
            cur.execute(
                "SELECT t::text FROM pg_prepared_statements, unnest(parameter_types) "
                "WITH ORDINALITY AS p(t, n) WHERE name = %s ORDER BY n",
                (_STATEMENT,),
            )
            args = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(row[0]))
                for value, row in zip(values, cur.fetchall(), strict=True)
            )
            cur.execute(
                sql.SQL("EXPLAIN ({}) EXECUTE {} ({})").format(
                    sql.SQL(options), sql.Identifier(_STATEMENT), args
                )
            )
            return _top(cur.fetchone())
    finally:
        # A prepared statement outlives the rollback of the transaction that made it.
        cur.execute("SELECT 1 FROM pg_prepared_statements WHERE name = %s", (_STATEMENT,))
        if cur.fetchone():
            cur.execute(f"DEALLOCATE {_STATEMENT}")


def _top(row: tuple[Any, ...] | None) -> Plan:
    assert row is not None
    doc = row[0]
    return dict(doc[0]["Plan"])


def _positional(query: str, params: Mapping[str, Any] | Sequence[Any]) -> tuple[str, list[Any]]:
    """`query` with $1, $2, … for psycopg's %(name)s / %s placeholders, and the values in
    that order (PREPARE needs the server's own placeholders)."""
    names: dict[str, int] = {}
    values: list[Any] = []
    sequence = iter(params) if not isinstance(params, Mapping) else None

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        name = match.group(1)
        if name is None:
            assert sequence is not None, "%s placeholders need a sequence of parameters"
            values.append(next(sequence))
            return f"${len(values)}"
        assert isinstance(params, Mapping), "%(name)s placeholders need a mapping"
        if name not in names:
            values.append(params[name])
            names[name] = len(values)
        return f"${names[name]}"

    return _PLACEHOLDER.sub(number, query), values


def _prepare(conn: psycopg.Connection[Any], text: str, values: list[Any]) -> None:
    """PREPARE the statement, its parameter types inferred by the server as for a query
    that casts its parameters; else typed as psycopg sends the values."""
    cur = conn.cursor(row_factory=tuple_row)
    try:
        with conn.transaction():
            cur.execute(f"PREPARE {_STATEMENT} AS {text}")
        return
    except psycopg.errors.IndeterminateDatatype:
        pass
    tx = Transformer(conn)
    tx.dump_sequence(values, [PyFormat.AUTO] * len(values))
    cur.execute(
        "SELECT coalesce(format_type(nullif(t.oid, 0), NULL), 'unknown') "
        "FROM unnest(%s::oid[]) WITH ORDINALITY AS t(oid, n) ORDER BY n",
        ([int(oid) for oid in tx.types],),
    )
    types = ", ".join(row[0] for row in cur.fetchall())
    cur.execute(f"PREPARE {_STATEMENT} ({types}) AS {text}")


# -- reading a plan -------------------------------------------------------------------------


def nodes(plan: Plan) -> Iterator[Plan]:
    """Every node of a plan, depth first (InitPlans and SubPlans included)."""
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def index_names(plan: Plan) -> set[str]:
    return {n["Index Name"] for n in nodes(plan) if "Index Name" in n}


def _rows(node: Plan, key: str) -> float:
    return float(node.get(key) or 0) * float(node.get("Actual Loops") or 1)


def problems_in(
    conn: psycopg.Connection[Any],
    plan: Plan,
    *,
    large: int = 1_000,
    allow_seq_scan: Sequence[str] = (),
) -> list[str]:
    problems = []
    # What the statement returns, or for a write without RETURNING, the rows it writes.
    output = float(plan.get("Actual Rows") or 0)
    if plan["Node Type"] == "ModifyTable" and plan.get("Plans"):
        output = max(output, *(float(c.get("Actual Rows") or 0) for c in plan["Plans"]))
    for node in nodes(plan):
        kind = node["Node Type"]
        relation = node.get("Relation Name")
        where = f"{node.get('Schema', '')}.{relation}".lstrip(".") if relation else ""
        read = _rows(node, "Actual Rows")
        discarded = _rows(node, "Rows Removed by Filter") + _rows(
            node, "Rows Removed by Index Recheck"
        )
        if kind == "Seq Scan" and relation not in allow_seq_scan:
            size = max(_reltuples(conn, node.get("Schema"), relation), read + discarded)
            if size > large:
                problems.append(
                    f"Seq Scan on {where} (~{size:,.0f} rows in the relation, "
                    f"{read + discarded:,.0f} read)"
                )
        elif relation and discarded > large and relation not in allow_seq_scan:
            problems.append(
                f"{kind} on {where} reads {read + discarded:,.0f} rows to keep "
                f"{read:,.0f} (filter: {node.get('Filter') or node.get('Recheck Cond')})"
            )
        elif relation and read > large and read > 2 * output:
            problems.append(
                f"{kind} on {where} reads {read:,.0f} rows for a statement of "
                f"{output:,.0f}: the index narrows the search too little"
            )
        joined_away = _rows(node, "Rows Removed by Join Filter")
        if joined_away > large:
            problems.append(
                f"{kind} throws away {joined_away:,.0f} row pairs in its join filter "
                f"({node.get('Join Filter')}): a join that should be a lookup"
            )
        spill = _spill(node)
        if spill:
            problems.append(f"{kind}{' on ' + where if where else ''} spilled to disk: {spill}")
    return problems


def _spill(node: Plan) -> str:
    if node.get("Sort Space Type") == "Disk":
        return f"{node.get('Sort Method')}, {node.get('Sort Space Used')} kB on disk"
    batches = max(int(node.get("Hash Batches") or 1), int(node.get("Original Hash Batches") or 1))
    if batches > 1:
        return f"hash in {batches} batches"
    if int(node.get("HashAgg Batches") or 0) > 1 or int(node.get("Disk Usage") or 0) > 0:
        return f"hash aggregate used {node.get('Disk Usage')} kB of disk"
    written = int(node.get("Temp Written Blocks") or 0)
    children = sum(int(c.get("Temp Written Blocks") or 0) for c in node.get("Plans", ()))
    if written > children:  # BUFFERS counts include the children's
        return f"{written - children} temporary blocks written"
    return ""


def _reltuples(conn: psycopg.Connection[Any], schema: str | None, relation: str | None) -> float:
    if relation is None:
        return 0.0
    cur = conn.cursor(row_factory=tuple_row)
    cur.execute(
        "SELECT c.reltuples FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND (%s::text IS NULL OR n.nspname = %s)",
        (relation, schema, schema),
    )
    return max((float(r[0]) for r in cur.fetchall()), default=0.0)


def render(plan: Plan, indent: str = "") -> str:
    """A compact tree: node, relation or index, rows and loops, what spilled."""

    def line(node: Plan, depth: int) -> Iterator[str]:
        parts = [
            node.get("Operation", "") if node["Node Type"] == "ModifyTable" else "",
            node["Node Type"],
        ]
        if node.get("CTE Name"):
            parts.append(node["CTE Name"])
        if node.get("Relation Name"):
            parts.append(f"on {node.get('Schema', '')}.{node['Relation Name']}".replace(" .", " "))
        if node.get("Index Name"):
            parts.append(f"using {node['Index Name']}")
        parts.append(
            f"(rows={float(node.get('Actual Rows') or 0):,.0f} "
            f"loops={int(node.get('Actual Loops') or 0)}"
            + (
                f" removed={float(node['Rows Removed by Filter']):,.0f}"
                if node.get("Rows Removed by Filter")
                else ""
            )
            + ")"
        )
        spill = _spill(node)
        if spill:
            parts.append(f"[{spill}]")
        text = " ".join(p for p in parts if p)
        yield f"{indent}{'  ' * depth}{'-> ' if depth else ''}{text}"
        for child in node.get("Plans", ()):
            yield from line(child, depth + 1)

    return "\n".join(line(plan, 0))
