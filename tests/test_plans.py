"""assert_index_driven (tests/plans.py) fails on the plans it must fail on; and every hot
statement of the log storage, down to each statement inside pgcg's functions, reads by
index on a 20k-message backlog, with statistics and without.

Run on PostgreSQL 15 too: `PGCG_TEST_SERVER=15 pytest -m pg15 tests/test_plans.py`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.shared.grants import CONSUMER_FUNCTIONS
from pgcg.shared.queries import Queries
from tests.conftest import _fresh_db
from tests.logclient import Owner, Row, give, nested_plans, tick_now
from tests.plans import Plan, assert_index_driven, explain, index_names, problems_in, render

pytestmark = pytest.mark.pg15

Q = Queries("consumer")
PRODUCER = Queries("producer")
OBSERVER = Queries("observer")
GROUP, TOPIC, MEMBER = "g1", "orders", "m1"
PARTITIONS = 4
BACKLOG = 20_000
KEYS = 1_000
BATCHES = 1_000  # producer calls, a tick after each: 20 messages a batch, as at 400 a second
DEEP_KEYS = 100  # keys whose messages are all parked (a key deep enough to pin its partition)
CLAIMED_KEYS = 40  # of those, keys whose head is running (claimed under the current epoch)
ROUND = 250  # the reader's limit per partition: prefetch 1,000 over 4 partitions
# Tables of a row or a few per topic, group or partition: scanned whole, whatever the plan.
SMALL = ("topics", "groups", "partition_assignments", "consumer_groups", "group_progress")


# -- a backlog -------------------------------------------------------------------------------


@dataclass
class Backlog:
    db: psycopg.Connection[dict[str, Any]]
    owner: Owner
    stats: str
    group_id: int
    first: list[Row]  # what the reader's first call returns (after the finished ones)

    def params(self, **extra: Any) -> dict[str, Any]:
        return self.owner.params(topic=TOPIC, **extra)

    def heads(self, *, running: bool) -> list[dict[str, Any]]:
        """The first parked message of each deep key: those running, or the others."""
        rows = self.db.execute(
            "SELECT DISTINCT ON (key) id, partition, key, claimed_epoch FROM pgcg.parked "
            "ORDER BY key, id"
        ).fetchall()
        return [r for r in rows if (r["claimed_epoch"] is not None) == running]


@pytest.fixture(scope="module", params=["analyzed", "no statistics"])
def backlog(pg_server: str, template_db: str, request: pytest.FixtureRequest) -> Iterator[Backlog]:
    """A topic of 4 partitions with 20k messages over 1,000 keys, in 1,000 batches (a tick
    after each producer call), read by a group whose 100 deepest keys are parked (2,000
    parked messages, the heads of 40 keys running, of 20 waiting for a retry), owned by
    MEMBER: with fresh statistics (as autovacuum leaves them), and
    without any (a new topic filled faster than autovacuum analyzes it, which is how a bench
    or a burst meets it). Every check runs in a transaction rolled back afterwards, so the
    module shares one database per case."""
    for dsn in _fresh_db(pg_server, template_db):
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as db:
            yield build(db, request.param)


def build(db: psycopg.Connection[dict[str, Any]], stats: str) -> Backlog:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, PARTITIONS))
    if stats == "no statistics":
        # Autovacuum must not analyze behind the test's back.
        tables = db.execute(
            "SELECT c.oid::regclass::text AS t FROM pg_class AS c "
            "WHERE c.relnamespace = 'pgcg'::regnamespace AND c.relkind = 'r'"
        ).fetchall()
        for row in tables:
            db.execute(f"ALTER TABLE {row['t']} SET (autovacuum_enabled = off)")
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    epochs = give(db, GROUP, MEMBER, list(range(PARTITIONS)))
    per_batch = BACKLOG // BATCHES
    for b in range(BATCHES):
        seq = range(b * per_batch, (b + 1) * per_batch)
        db.execute(
            PRODUCER.enqueue,
            {
                "topic": TOPIC,
                "keys": [f"key-{n % KEYS}" for n in seq],
                "payloads": [json.dumps({"seq": n}) for n in seq],
                "headers": None,
                "dedup_keys": [f"d-{n}" for n in seq],
                "delays_ms": None,
            },
        )
        tick_now(db, TOPIC)
    (group,) = db.execute("SELECT id FROM pgcg.groups WHERE group_name = %s", (GROUP,))
    group_id = group["id"]
    # The deep keys, parked as the writer parks them: copies of their messages, due at
    # once, and 'd' ledger rows for their offsets.
    db.execute(
        """
        INSERT INTO pgcg.parked (group_id, partition, gen, "offset", tick, key, payload, headers,
                                 dedup_key, enqueued_at, available_at, attempts, origin)
        SELECT %(g)s, l.partition, 0, l."offset",
               (SELECT min(k.tick) FROM pgcg.ticks AS k JOIN pgcg.topics AS t ON t.id = k.topic_id
                WHERE t.name = %(topic)s AND k.offsets[l.partition + 1] >= l."offset"),
               l.key, l.payload, l.headers, l.dedup_key, l.enqueued_at,
               now(), 1, 'deep'
        FROM pgcg.log AS l
        WHERE l.key = ANY (%(keys)s)
        ORDER BY l.partition, l."offset"
        """,
        {"g": group_id, "topic": TOPIC, "keys": [f"key-{k}" for k in range(DEEP_KEYS)]},
    )
    db.execute(
        """
        INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets, parked)
        SELECT min(l.slot), %(g)s, pk.partition, 'd', 0, 1, pk.tick, array_agg(pk."offset"), true
        FROM pgcg.parked AS pk JOIN pgcg.log AS l
          ON l.partition = pk.partition AND l."offset" = pk."offset"
        GROUP BY pk.partition, pk.tick
        """,
        {"g": group_id},
    )
    # The heads of the last 20 deep keys wait for a retry in an hour.
    db.execute(
        "UPDATE pgcg.parked SET available_at = now() + interval '1 hour', attempts = 2 "
        "WHERE id IN (SELECT min(id) FROM pgcg.parked WHERE key = ANY (%s) GROUP BY key)",
        ([f"key-{k}" for k in range(DEEP_KEYS - 20, DEEP_KEYS)],),
    )
    db.execute(
        """
        UPDATE pgcg.parked AS pk SET claimed_epoch = %(epoch)s, claimed_by = %(member)s,
            claim_token = 'running-' || pk.id, attempts = 2,
            locked_until = now() + interval '1 minute'
        WHERE pk.id IN (SELECT min(q.id) FROM pgcg.parked AS q
                        WHERE q.key = ANY (%(keys)s) GROUP BY q.key)
        """,
        {"epoch": epochs[0], "member": MEMBER,
         "keys": [f"key-{k}" for k in range(CLAIMED_KEYS)]},
    )  # fmt: skip
    if stats == "analyzed":
        db.execute("ANALYZE")
    owner = Owner(db, GROUP, MEMBER)
    for partition, epoch in epochs.items():
        assert owner.adopt(partition, epoch) is not None
    first = owner.fetch(limit=ROUND)
    assert len(first) > 3 * ROUND  # the deep keys' messages are finished (parked)
    return Backlog(db, owner, stats, group_id, first)


# -- checking the statements inside functions -----------------------------------------------


def assert_nested_index_driven(
    backlog: Backlog,
    query: str,
    params: Mapping[str, Any],
    *,
    large: int = 1_000,
    allow_seq_scan: tuple[str, ...] = SMALL,
) -> dict[str, list[Plan]]:
    """assert_index_driven for every statement `query` runs inside pgcg's functions: as
    their first executions in a session plan them (custom plans, PL/pgSQL's first five),
    and as a generic plan, which a session settles on after that."""
    db = backlog.db
    found: dict[str, list[Plan]] = {}
    text = []
    for mode in ("custom", "generic"):
        value = "force_generic_plan" if mode == "generic" else "auto"
        db.execute("SELECT set_config('plan_cache_mode', %s, false)", (value,))
        try:
            plans = nested_plans(db, query, params)
        finally:
            db.execute("RESET plan_cache_mode")
        found[mode] = plans
        for plan in plans:
            problems = problems_in(db, plan, large=large, allow_seq_scan=allow_seq_scan)
            if problems:
                text.append(f"{mode} plan of: {' '.join(plan['Query Text'].split())[:300]}")
                text.extend(f"  - {p}" for p in problems)
                text.append(render(plan, indent="    "))
    if text:
        server = db.info.server_version
        raise AssertionError(
            f"server {server}, {backlog.stats}: not index-driven\n" + "\n".join(text)
        )
    return found


def statement(plans: list[Plan], fragment: str) -> Plan:
    """The plan of the (one) statement whose text contains `fragment`."""
    matching = [p for p in plans if fragment in p["Query Text"]]
    assert matching, f"no statement with {fragment!r} in {[p['Query Text'][:80] for p in plans]}"
    return matching[0]


def fetch_params(backlog: Backlog, limit: int = ROUND) -> dict[str, Any]:
    parts = sorted(backlog.owner.parts.values(), key=lambda p: p.partition)
    return backlog.params(
        partitions=[p.partition for p in parts], done=[p.done for p in parts],
        cur=[p.cur for p in parts], cur_offsets=[p.cur_offset for p in parts],
        limit=limit, limit_bytes=1 << 30,
    )  # fmt: skip


def epoch(backlog: Backlog, partition: int) -> int:
    return backlog.owner.parts[partition].epoch


# -- the checker itself ----------------------------------------------------------------------


def test_a_sequential_scan_of_a_big_table_fails(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE TABLE big AS SELECT n, md5(n::text) AS h FROM generate_series(1, 5000) n")
    db.execute("ANALYZE big")
    with pytest.raises(AssertionError, match=r"Seq Scan on public\.big \(~5,000 rows"):
        assert_index_driven(db, "SELECT * FROM big WHERE h = %(h)s", {"h": "x"})
    db.execute("CREATE INDEX ON big (h)")
    plans = assert_index_driven(db, "SELECT * FROM big WHERE h = %(h)s", {"h": "x"})
    assert set(plans) == {"custom", "generic"}
    # A small table may be scanned: that is cheaper than any index.
    db.execute("CREATE TABLE small AS SELECT n FROM generate_series(1, 50) n")
    assert_index_driven(db, "SELECT * FROM small WHERE n = %s", [7])


def test_an_index_scan_that_discards_most_of_what_it_reads_fails(
    db: psycopg.Connection[Any],
) -> None:
    db.execute("CREATE TABLE t AS SELECT n / 5000 AS a, n AS b FROM generate_series(1, 10000) n")
    db.execute("CREATE INDEX ON t (a)")
    db.execute("ANALYZE t")
    with pytest.raises(AssertionError, match=r"reads 5,000 rows to keep 1 \(filter: "):
        assert_index_driven(db, "SELECT * FROM t WHERE a = 1 AND b = %(b)s", {"b": 5001},
                            modes=["custom"], settings={"enable_seqscan": "off",
                                                        "enable_bitmapscan": "off"})  # fmt: skip


def test_a_sort_that_spills_fails(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE TABLE s AS SELECT n, md5(n::text) AS h FROM generate_series(1, 20000) n")
    db.execute("CREATE INDEX ON s (n)")
    db.execute("ANALYZE s")
    query = "SELECT * FROM s WHERE n > %(n)s ORDER BY h"
    with pytest.raises(AssertionError, match=r"Sort spilled to disk: external"):
        assert_index_driven(db, query, {"n": 0}, large=100_000,
                            settings={"work_mem": "64kB"})  # fmt: skip
    assert_index_driven(db, query, {"n": 19_900}, settings={"work_mem": "64kB"})


def test_a_scan_inside_a_function_is_seen(db: psycopg.Connection[Any]) -> None:
    """The statements pgcg runs live in functions: their plans are checked one by one."""
    db.execute("CREATE TABLE big AS SELECT n, md5(n::text) AS h FROM generate_series(1, 5000) n")
    db.execute("ANALYZE big")
    db.execute(
        "CREATE FUNCTION find(p text) RETURNS bigint LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN (SELECT count(*) FROM big WHERE h = p); END $$"
    )
    plans = nested_plans(db, "SELECT find(%s)", ["x"])
    inner = statement(plans, "FROM big")
    assert any(p.startswith("Seq Scan on big") for p in problems_in(db, inner))


def test_the_check_leaves_nothing_behind(backlog: Backlog) -> None:
    db = backlog.db
    before = db.execute("SELECT count(*) AS n FROM pgcg.ledger").fetchone()
    parts = sorted(backlog.owner.parts.values(), key=lambda p: p.partition)
    saved = backlog.params(
        partitions=[p.partition for p in parts],
        epochs=[p.epoch for p in parts],
        ticks=[p.done for p in parts],
    )
    plan = explain(db, Q.save_position, saved, mode="generic")
    assert plan["Actual Rows"] == PARTITIONS
    assert_nested_index_driven(backlog, Q.settle, settle_params(backlog, done=backlog.first[:10]))
    # The ledger rows were rolled back, and the prepared statement is gone.
    assert db.execute("SELECT count(*) AS n FROM pgcg.ledger").fetchone() == before
    positions = db.execute("SELECT max(tick) AS t FROM pgcg.group_progress").fetchone()
    assert positions is not None and positions["t"] < parts[0].done
    prepared = db.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchone()
    assert prepared == {"n": 0}


# -- the hot statements ----------------------------------------------------------------------


def test_the_reader_reads_a_round_by_index(backlog: Backlog) -> None:
    """The reader's next round (each partition's cursor inside a batch, its deep keys
    parked): the log by (partition, offset) ranges, the parked keys probed by key, and
    nothing read that is not returned."""
    params = fetch_params(backlog)
    plans = assert_nested_index_driven(backlog, Q.fetch, params)
    for mode, found in plans.items():
        read = statement(found, "pgcg.log_orders AS l")
        assert read["Actual Rows"] >= PARTITIONS * ROUND, mode
        names = index_names(read)
        assert any(n.endswith("partition_offset_txid_idx") for n in names), (mode, names)
        assert any(n.endswith("_hashtextextended_id_idx") or n == "parked_key"
                   for n in names), (mode, names)  # fmt: skip


def test_the_reader_starts_a_batch_by_index(backlog: Backlog) -> None:
    """A round that starts on batch boundaries (no cursor inside a batch), from a position
    in the middle of the backlog."""
    params = fetch_params(backlog)
    middle = backlog.db.execute(
        "SELECT tick FROM pgcg.ticks ORDER BY tick OFFSET %s LIMIT 1", (BATCHES // 2,)
    ).fetchone()
    assert middle is not None
    params.update(done=[middle["tick"]] * PARTITIONS, cur=[None] * PARTITIONS,
                  cur_offsets=[None] * PARTITIONS)  # fmt: skip
    plans = assert_nested_index_driven(backlog, Q.fetch, params)
    for found in plans.values():
        assert statement(found, "pgcg.log_orders AS l")["Actual Rows"] >= PARTITIONS * ROUND


def test_loading_parked_messages_reads_by_index(backlog: Backlog) -> None:
    """The due heads of the parked keys and their followers: 100 deep keys parked whole,
    their messages due, the heads of 40 running and of 20 waiting for a retry. Only the
    flagged heads are read (parked_heads), not every due parked message."""
    params = backlog.params(partitions=list(range(PARTITIONS)), held=[], lookahead_ms=1000,
                            limit=ROUND // 17, followers=16)  # fmt: skip
    plans = assert_nested_index_driven(backlog, Q.load_parked, params)
    for mode, found in plans.items():
        assert found[-1]["Actual Rows"] > 0
        names = index_names(statement(found, "heads AS"))
        assert "parked_heads" in names, (mode, names)


def test_the_next_due_parked_message_is_found_by_index(backlog: Backlog) -> None:
    """When an idle reader next has a parked message to load: per partition, the first
    loadable flagged head in parked_heads order, and the running heads' claims it passed
    over, not every parked message. The due heads make it due now."""
    params = backlog.params(partitions=list(range(PARTITIONS)))
    plans = assert_nested_index_driven(backlog, Q.next_parked, params)
    for mode, found in plans.items():
        names = index_names(statement(found, "firsts AS"))
        assert "parked_heads" in names, (mode, names)
    row = backlog.db.execute(Q.next_parked, params).fetchone()
    assert row == {"due_in_ms": 0}
    with backlog.db.transaction(force_rollback=True):
        # Nothing unclaimed due for an hour: the first claim to run out (a minute) decides.
        backlog.db.execute(
            "UPDATE pgcg.parked SET available_at = now() + interval '1 hour' "
            "WHERE claimed_epoch IS NULL"
        )
        row = backlog.db.execute(Q.next_parked, params).fetchone()
        assert row is not None and 30_000 < row["due_in_ms"] <= 60_000
        backlog.db.execute(
            "UPDATE pgcg.parked SET claimed_epoch = NULL, locked_until = NULL, "
            "available_at = now() + interval '1 hour'"
        )
        row = backlog.db.execute(Q.next_parked, params).fetchone()
        assert row is not None and 3_000_000 < row["due_in_ms"] <= 3_600_000
        backlog.db.execute("DELETE FROM pgcg.parked")
        assert backlog.db.execute(Q.next_parked, params).fetchone() == {"due_in_ms": None}


def settle_params(
    backlog: Backlog,
    *,
    start: list[Row] = (),  # type: ignore[assignment]
    done: list[Row] = (),  # type: ignore[assignment]
    park: list[Row] = (),  # type: ignore[assignment]
    claims: list[dict[str, Any]] = (),  # type: ignore[assignment]
    handled: list[dict[str, Any]] = (),  # type: ignore[assignment]
    retried: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """One round of the writer: marks, claims of parked heads, log results, parked results."""
    start, items = list(start), list(done) + list(park)
    kinds = ["d"] * len(done) + ["p"] * len(park)
    results = list(handled) + list(retried)
    k_kinds = ["d"] * len(handled) + ["r"] * len(retried)
    return backlog.params(
        m_parts=[r.partition for r in start], m_epochs=[epoch(backlog, r.partition) for r in start],
        m_ticks=[r.tick for r in start], m_offsets=[r.offset for r in start],
        m_slots=[r.slot for r in start],
        c_ids=[c["id"] for c in claims], c_parts=[c["partition"] for c in claims],
        c_epochs=[epoch(backlog, c["partition"]) for c in claims],
        c_tokens=[f"{MEMBER}:{c['id']}" for c in claims], visibility_ms=60_000,
        l_kinds=kinds, l_parts=[r.partition for r in items],
        l_epochs=[epoch(backlog, r.partition) for r in items], l_ticks=[r.tick for r in items],
        l_offsets=[r.offset for r in items], l_slots=[r.slot for r in items],
        l_attempts=[1] * len(items), l_delays=[0 if k == "d" else 1000 for k in kinds],
        l_errors=[None if k == "d" else "boom" for k in kinds],
        l_origins=[None if k == "d" else "retry" for k in kinds],
        l_claimed=[False] * len(items),
        k_kinds=k_kinds, k_ids=[r["id"] for r in results],
        k_parts=[r["partition"] for r in results],
        k_epochs=[epoch(backlog, r["partition"]) for r in results],
        k_delays=[0 if k == "d" else 1000 for k in k_kinds],
        k_errors=[None if k == "d" else "boom" for k in k_kinds],
    )  # fmt: skip


def test_a_round_of_results_is_written_by_index(backlog: Backlog) -> None:
    """The writer's round at load: the marks of the next 1,000 messages, the results of
    1,000 (a few parked for a retry), claims of parked heads and results of running ones."""
    rows = backlog.first
    running, waiting = backlog.heads(running=True), backlog.heads(running=False)
    assert len(running) == CLAIMED_KEYS and len(waiting) == DEEP_KEYS - CLAIMED_KEYS
    params = settle_params(
        backlog, start=rows, done=rows[10:], park=rows[:10], claims=waiting[:20],
        handled=running[:20], retried=running[20:],
    )  # fmt: skip
    plans = assert_nested_index_driven(backlog, Q.settle, params)
    for found in plans.values():
        answer = found[-1]
        assert answer["Actual Rows"] == PARTITIONS + 20 + len(rows) + len(running)


def test_progress_reports_are_written_by_index(backlog: Backlog) -> None:
    running = backlog.heads(running=True)
    params = backlog.params(
        ids=[r["id"] for r in running], partitions=[r["partition"] for r in running],
        epochs=[epoch(backlog, r["partition"]) for r in running],
        percents=[50.0] * len(running), texts=["half way"] * len(running), visibility_ms=60_000,
    )  # fmt: skip
    plans = assert_nested_index_driven(backlog, Q.report_progress, params)
    for found in plans.values():
        update = statement(found, "UPDATE pgcg.parked")
        assert any(n == "parked_pkey" for n in index_names(update)), render(update)


def test_positions_are_saved_by_index(backlog: Backlog) -> None:
    parts = sorted(backlog.owner.parts.values(), key=lambda p: p.partition)
    saved = backlog.params(
        partitions=[p.partition for p in parts],
        epochs=[p.epoch for p in parts],
        ticks=[p.done for p in parts],
    )
    assert_nested_index_driven(backlog, Q.save_position, saved)
    released = dict(saved, clean=[True] * len(parts), revoked_only=False)
    assert_nested_index_driven(backlog, Q.release, released)


def test_adopting_a_partition_reads_by_index(backlog: Backlog) -> None:
    part = backlog.owner.parts[0]
    params = backlog.params(partition=0, epoch=part.epoch, max_attempts=5, retry_delay_ms=0)
    assert_nested_index_driven(backlog, Q.adopt, params)


def test_lag_is_read_without_counting(backlog: Backlog) -> None:
    plans = assert_nested_index_driven(backlog, OBSERVER.group_lag, {"group": GROUP})
    for found in plans.values():
        assert found[-1]["Actual Rows"] == PARTITIONS


def test_an_enqueue_writes_by_index(backlog: Backlog) -> None:
    """A producer's batch of 500, with dedup keys: half new, half within the window."""
    n = 500
    params = {
        "topic": TOPIC,
        "keys": [f"key-{i % KEYS}" for i in range(n)],
        "payloads": [json.dumps({"i": i}) for i in range(n)],
        "headers": None,
        "dedup_keys": [f"d-{i * 2 if i % 2 else BACKLOG + i}" for i in range(n)],
        "delays_ms": None,
    }
    plans = assert_nested_index_driven(backlog, PRODUCER.enqueue, params)
    for found in plans.values():
        assert found[-1]["Actual Rows"] == n


def _plans_as_bound_role(db: psycopg.Connection[Any], query: str, params: Mapping[str, Any],
                         mode: str) -> list[Plan]:  # fmt: skip
    """nested_plans, run by a session whose login is a consumer role bound to GROUP (not a
    member of the owner, so the binding's lookup runs), in a transaction rolled back with the
    role. auto_explain is loaded and set up first: a plain role may do neither."""
    notices: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        if diag.message_primary and diag.message_primary.startswith("duration:"):
            notices.append(diag.message_primary)

    role = f"pgcg_bound_{uuid.uuid4().hex[:8]}"
    functions = ", ".join(f"pgcg.{f}" for f in CONSUMER_FUNCTIONS)
    db.add_notice_handler(collect)
    try:
        with db.transaction(force_rollback=True), db.cursor(row_factory=dict_row) as cur:
            cur.execute(f'CREATE ROLE "{role}"')
            cur.execute(f'GRANT USAGE ON SCHEMA pgcg TO "{role}"')
            cur.execute(f'GRANT EXECUTE ON FUNCTION {functions} TO "{role}"')
            cur.execute(
                "INSERT INTO pgcg.role_scopes (kind, name, role_id, topic) "
                "VALUES ('group', %s, %s::regrole, %s)",
                (GROUP, role, TOPIC),
            )
            cur.execute("LOAD 'auto_explain'")
            value = "force_generic_plan" if mode == "generic" else "auto"
            for name, setting in (
                ("plan_cache_mode", value),
                ("auto_explain.log_min_duration", "0"),
                ("auto_explain.log_analyze", "on"),
                ("auto_explain.log_buffers", "on"),
                ("auto_explain.log_timing", "off"),
                ("auto_explain.log_nested_statements", "on"),
                ("auto_explain.log_format", "json"),
                ("client_min_messages", "log"),
            ):
                cur.execute("SELECT set_config(%s, %s, true)", (name, setting))
            cur.execute(f'SET LOCAL SESSION AUTHORIZATION "{role}"')
            assert cur.execute("SELECT session_user AS u").fetchone() == {"u": role}
            notices.clear()
            cur.execute(query, params)
    finally:
        db.remove_notice_handler(collect)
    plans = []
    for text in notices:
        doc = json.loads(text.split("plan:", 1)[1])
        plans.append(dict(doc["Plan"], **{"Query Text": doc.get("Query Text", "")}))
    return plans


@pytest.mark.parametrize("mode", ["custom", "generic"])
def test_a_bound_role_checks_its_binding_once_per_call(backlog: Backlog, mode: str) -> None:
    """Under a role bound to the group (no table privileges, the bindings really looked up):
    one binding check per call however many rows come back, and the reader's statements
    read by index as they do for the owner."""
    found = _plans_as_bound_role(backlog.db, Q.fetch, fetch_params(backlog), mode)
    checks = [p for p in found if "pgcg.role_scopes" in p["Query Text"]]
    assert len(checks) == 1, [p["Query Text"][:80] for p in found]
    read = statement(found, "pgcg.log_orders AS l")
    assert read["Actual Rows"] >= PARTITIONS * ROUND
    for plan in found:
        problems = problems_in(backlog.db, plan, allow_seq_scan=(*SMALL, "role_scopes"))
        assert not problems, (mode, problems, render(plan))
    assert found[-1]["Actual Rows"] >= PARTITIONS * ROUND
