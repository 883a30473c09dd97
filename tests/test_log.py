"""The log storage through its SQL API, against a real PostgreSQL (15 and 18): commit order
through ticks, every group gets every message, enqueue limits in the database, the dedup
window, sealing and reclaiming segments while producers run, charging cut-off deliveries,
and index-driven plans at a large backlog."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.helpers import wait_for
from tests.logclient import Owner, enqueue, give, nested_plans, tick_now
from tests.plans import problems_in, render

pytestmark = pytest.mark.pg15

TOPIC = "orders"


@pytest.fixture
def topic(db: psycopg.Connection[dict[str, Any]]) -> str:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    return TOPIC


def connect(dsn: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(dsn, row_factory=dict_row)


def owner_of(db: psycopg.Connection[Any], group: str, partitions: list[int] = [0, 1]) -> Owner:  # noqa: B006
    db.execute("SELECT pgcg.create_group(%s, %s)", (group, TOPIC))
    owner = Owner(db, group, f"{group}-member")
    for partition, epoch in give(db, group, owner.member, partitions).items():
        assert owner.adopt(partition, epoch) is not None
    return owner


def read_all(owner: Owner) -> list[Any]:
    got: list[Any] = []
    for _ in range(50):
        rows = owner.fetch()
        if not rows:
            return got
        got.extend(rows)
    raise AssertionError("the reader never reached the end")


def test_ids_that_commit_out_of_order_are_read_in_commit_order(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """A takes an offset and stays open; B takes the next one and commits; the reader
    passes B's. A, committed later (and under a savepoint), is still read, after B."""
    owner = owner_of(db, "billing")
    with connect(dsn) as a, connect(dsn) as b:
        a.execute("SAVEPOINT s")
        (first,) = enqueue(a, topic, ["k"], [{"from": "A"}])
        a.execute("RELEASE SAVEPOINT s")
        (second,) = enqueue(b, topic, ["k"], [{"from": "B"}])
        b.commit()
        tick_now(db, topic)
        assert [r.id for r in read_all(owner)] == [second]
        a.commit()
    tick_now(db, topic)
    assert [r.id for r in read_all(owner)] == [first]
    assert first < second  # the lower offset came second: commit order, not offset order


def test_a_producer_whose_xid_is_above_the_ticks_xmax_is_still_read(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """A snapshot's xmax is one past the newest *completed* transaction, not the next xid:
    a producer that took its xid and its offset, and is still open when a tick is taken
    with nothing newer completed, is not listed as running in that tick's snapshot. It is
    invisible there all the same, and must be read once it commits."""
    owner = owner_of(db, "billing")
    with connect(dsn) as a, connect(dsn) as b:
        (first,) = enqueue(a, topic, ["k"], [{"from": "A"}])
        tick_now(db, topic)  # nothing newer than A's xid has completed: xmax <= A's xid
        a.commit()
        (second,) = enqueue(b, topic, ["j"], [{"from": "B"}])
        b.commit()
    tick_now(db, topic)
    assert sorted(r.id for r in read_all(owner)) == sorted([first, second])


def test_producers_racing_ticks_lose_nothing_and_read_nothing_twice(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """Producers committing at random moments (some held open across ticks, some under a
    savepoint, some rolled back) while ticks are taken as fast as possible: every committed
    message is read exactly once, and nothing rolled back is read."""
    import random
    import threading

    owner = owner_of(db, "billing")
    committed: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with connect(dsn) as conn:
                for i in range(60):
                    if rnd.random() < 0.3:
                        conn.execute("SAVEPOINT s")
                    ids = enqueue(conn, topic, [f"k{seed}-{i % 7}"], [{"i": i}])
                    if rnd.random() < 0.2:
                        # Held open while other producers commit and ticks are taken.
                        deadline = time.monotonic() + rnd.uniform(0, 0.05)
                        while time.monotonic() < deadline:
                            conn.execute("SELECT 1")
                    if rnd.random() < 0.1:
                        conn.rollback()
                    else:
                        conn.commit()
                        committed.extend(ids)
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    def ticker() -> None:
        try:
            with connect(dsn) as conn:
                conn.autocommit = True
                while not stop.is_set():
                    tick_now(conn, topic)
        except BaseException as exc:
            errors.append(exc)

    producers = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    ticking = threading.Thread(target=ticker)
    ticking.start()
    for t in producers:
        t.start()
    got: list[int] = []
    while any(t.is_alive() for t in producers):
        got.extend(r.id for r in owner.fetch())
    stop.set()
    ticking.join()
    assert not errors, errors
    tick_now(db, topic)
    got.extend(r.id for r in read_all(owner))
    assert len(got) == len(set(got)), "a message was read twice"
    assert sorted(got) == sorted(committed)


def test_inside_a_batch_a_key_follows_causal_order(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """B got its xid first, then read A's committed message and enqueued after it, in the
    same tick interval: B's message must come after A's (offset order), not before it (xid
    order would put it first)."""
    owner = owner_of(db, "billing")
    with connect(dsn) as a, connect(dsn) as b:
        b.execute("SELECT pg_current_xact_id()")  # B's xid, before A's
        (created,) = enqueue(a, topic, ["order-7"], [{"event": "created"}])
        a.commit()
        (updated,) = enqueue(b, topic, ["order-7"], [{"event": "updated"}])
        b.commit()
    tick_now(db, topic)
    assert [r.payload["event"] for r in read_all(owner)] == ["created", "updated"]
    assert created < updated


def test_every_group_gets_every_message_at_its_own_pace(
    db: psycopg.Connection[Any], topic: str
) -> None:
    billing = owner_of(db, "billing")
    ids = enqueue(db, topic, [f"k{i}" for i in range(20)])
    tick_now(db, topic)
    assert sorted(r.id for r in read_all(billing)) == sorted(ids)
    # A group created afterwards starts at the earliest retained message...
    audit = owner_of(db, "audit")
    assert sorted(r.id for r in read_all(audit)) == sorted(ids)
    # ...and one created at `latest` only gets what comes after it.
    db.execute("SELECT pgcg.create_group('late', %s, 'latest')", (topic,))
    late = Owner(db, "late", "late-member")
    for p, e in give(db, "late", late.member, [0, 1]).items():
        late.adopt(p, e)
    more = enqueue(db, topic, ["x", "y"])
    tick_now(db, topic)
    assert sorted(r.id for r in read_all(late)) == sorted(more)
    assert sorted(r.id for r in read_all(billing)) == sorted(more)


def test_a_replayed_dead_letter_reaches_only_its_group(
    db: psycopg.Connection[Any], topic: str
) -> None:
    billing, audit = owner_of(db, "billing"), owner_of(db, "audit")
    enqueue(db, topic, ["k"])
    tick_now(db, topic)
    (row,) = read_all(billing)
    read_all(audit)
    billing.settle(start=[row])
    billing.settle(dead=[row])
    (dead,) = db.execute("SELECT id FROM pgcg.dead_letters WHERE group_name = 'billing'")
    (replayed,) = db.execute(
        "SELECT * FROM pgcg.replay_dead_letters('billing', %s)", ([dead["id"]],)
    )
    tick_now(db, topic)
    assert [r.id for r in read_all(billing)] == [replayed["id"]]
    assert read_all(audit) == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("k" * 1025, {}, None, None, None), "ordering key is 1025 bytes"),
        (("é" * 600, {}, None, None, None), "ordering key is 1200 bytes"),
        (("", {}, None, None, None), "non-empty"),
        (("k", {"x": "y" * 2_000_000}, None, None, None), "over the topic's limit"),
        (("k", {}, {"h": 1}, None, None), "headers must be a JSON object of strings"),
        (("k", {}, {"h": "v" * 70_000}, None, None), "headers are"),
        (("k", {}, None, "d" * 513, None), "dedup key is 513 bytes"),
        (("k", {}, None, None, -1), "delay must be between"),
        (("k", {}, None, None, 10**15), "delay must be between"),
    ],
)
def test_enqueue_limits_are_checked_in_the_database_and_nothing_is_written(
    db: psycopg.Connection[Any], topic: str, args: tuple[Any, ...], error: str
) -> None:
    """What another language's producer gets calling pgcg.enqueue directly: one clear error,
    nothing of the call written (the good message before the bad one neither)."""
    key, payload, headers, dedup, delay = args
    with pytest.raises(psycopg.Error, match=error):
        db.execute(
            "SELECT * FROM pgcg.enqueue(%s, %s, %s::jsonb[], %s::jsonb[], %s, %s)",
            (
                topic, ["good", key], [json.dumps({}), json.dumps(payload)],
                [None, json.dumps(headers) if headers is not None else None],
                [None, dedup], [None, delay],
            ),
        )  # fmt: skip
    assert db.execute("SELECT count(*) AS n FROM pgcg.log").fetchone()["n"] == 0


def test_dedup_skips_within_the_window_whether_or_not_the_first_was_handled(
    db: psycopg.Connection[Any], topic: str
) -> None:
    db.execute("SELECT pgcg.alter_topic(%s, p_dedup_window_ms => 300000)", (topic,))

    def send(dedup: str, key: str = "k") -> Any:
        (row,) = db.execute(
            "SELECT id FROM pgcg.enqueue(%s, ARRAY[%s], ARRAY['{}'::jsonb], NULL, ARRAY[%s])",
            (topic, key, dedup),
        ).fetchall()
        return row["id"]

    first = send("order-1")
    assert first is not None
    assert send("order-1") is None  # a retry after a lost commit reply: skipped
    assert send("order-1", key="other") is not None  # dedup is per ordering key
    assert send("order-2") is not None
    db.execute("UPDATE pgcg.dedup SET expires_at = now() - interval '1 second'")
    assert send("order-1") is not None  # the window passed


def test_fetch_refuses_a_snapshot_older_than_its_statement(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """A tick taken in REPEATABLE READ could be older than the newest: refused."""
    owner_of(db, "billing")
    enqueue(db, topic, ["k"])
    with connect(dsn) as rr:
        rr.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.Error, match="READ COMMITTED"):
            rr.execute("SELECT pgcg.tick(id) FROM pgcg.topics WHERE name = %s", (topic,))


def test_a_producer_held_open_across_a_rotation_is_read_and_holds_its_segment(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    """A producer that wrote into segment 0 and stays open while the topic rotates to
    segment 1: segment 0 cannot seal (its slot lock is held) nor be reclaimed until the
    producer commits, and its message is delivered."""
    db.execute("SELECT pgcg.alter_topic(%s, p_retention_ms => 0)", (topic,))
    owner = owner_of(db, "billing")
    with connect(dsn) as producer:
        (late,) = enqueue(producer, topic, ["k"])
        # Rotate twice (prepare, then switch) while it is open.
        db.execute("UPDATE pgcg.segments SET created_at = now() - interval '1 hour'")
        events = db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,)).fetchall()
        events += db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,)).fetchall()
        assert ("switched", 1) in [(e["event"], e["seq"]) for e in events], events
        for _ in range(3):
            events += db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,)).fetchall()
        assert not [e for e in events if e["seq"] == 0 and e["event"] in ("sealed", "reclaimed")]
        producer.commit()
    tick_now(db, topic)
    assert [r.id for r in read_all(owner)] == [late]
    wait_for(
        lambda: (
            "sealed"
            in [e["event"] for e in db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,))]
        ),
        10,
        "segment 0 sealed once its producer ended",
    )


def test_a_reclaim_waits_for_every_group_and_never_blocks_inserts(
    db: psycopg.Connection[Any], dsn: str, topic: str
) -> None:
    db.execute("SELECT pgcg.alter_topic(%s, p_retention_ms => 0)", (topic,))
    owner = owner_of(db, "billing")
    ids = enqueue(db, topic, ["k", "j"])
    tick_now(db, topic)

    def maintain() -> list[dict[str, Any]]:
        db.execute("UPDATE pgcg.segments SET created_at = now() - interval '1 hour'")
        return db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,)).fetchall()

    for _ in range(4):  # prepare, switch and seal segment 0
        maintain()
    tick_now(db, topic)
    held = [e for e in maintain() if e["event"] == "held"]
    assert {e["group_name"] for e in held} == {"billing"}, "the group has not finished segment 0"
    rows = read_all(owner)
    assert sorted(r.id for r in rows) == sorted(ids)
    owner.settle(start=rows)
    owner.settle(done=rows)
    read_all(owner)
    assert owner.save() == [0, 1]
    # A reader holding an older slot's table (a long report) does not block producers.
    with connect(dsn) as reader:
        reader.execute("SELECT count(*) FROM pgcg.log_orders_0")
        before = time.monotonic()
        enqueue(db, topic, ["x"])
        assert time.monotonic() - before < 5, "an insert waited behind the reclaim"
        events = [e["event"] for e in maintain()]
        assert "reclaimed" not in events  # busy: the lock timeout, retried later
        reader.rollback()
    wait_for(lambda: "reclaimed" in [e["event"] for e in maintain()], 10, "segment 0 reclaimed")


def test_a_topic_nobody_reads_still_gives_back_its_space(
    db: psycopg.Connection[Any], topic: str
) -> None:
    """No group and no consumer, so no fetch ever takes a tick: the retention still
    reclaims the segments it lets go."""
    db.execute("SELECT pgcg.alter_topic(%s, p_retention_ms => 0)", (topic,))
    enqueue(db, topic, ["k", "j"])

    def maintain() -> list[str]:
        db.execute("UPDATE pgcg.segments SET created_at = now() - interval '1 hour'")
        db.execute("UPDATE pgcg.segments SET sealed_at = sealed_at - interval '1 hour'")
        return [e["event"] for e in db.execute("SELECT * FROM pgcg.maintain(%s)", (topic,))]

    wait_for(lambda: "reclaimed" in maintain(), 10, "segment 0 reclaimed without a reader")
    assert db.execute("SELECT count(*) AS n FROM pgcg.log_orders_0").fetchone()["n"] == 0


def test_a_hand_off_charges_exactly_the_deliveries_that_were_cut_off(
    db: psycopg.Connection[Any], topic: str
) -> None:
    """The first owner started three messages and finished one, then died: the next owner
    parks the two cut off, with their attempt counted, and nothing else. Adopting again
    charges nothing twice; a clean release charges nothing at all."""
    first = owner_of(db, "billing", [0])
    enqueue(db, topic, [f"k{i}" for i in range(40)])
    tick_now(db, topic)
    rows = read_all(first)
    started = rows[:3]
    first.settle(start=started)
    first.settle(done=started[:1])
    second = Owner(db, "billing", "second")
    (epoch,) = give(db, "billing", second.member, [0]).values()
    charged = second.adopt(0, epoch)
    assert charged is not None and (charged["charged"], charged["buried"]) == (2, 0)
    parked = db.execute('SELECT "offset", attempts, origin FROM pgcg.parked ORDER BY id').fetchall()
    assert [(p["offset"], p["attempts"], p["origin"]) for p in parked] == [
        (r.offset, 1, "interrupted") for r in started[1:]
    ]
    again = second.adopt(0, epoch)
    assert again is not None and again["charged"] == 0
    # The second owner finishes everything, releases cleanly: the third charges nothing.
    rest = read_all(second)
    assert {r.offset for r in rest} == {r.offset for r in rows[3:]}
    second.settle(start=rest[:5])
    second.release([0], {0: second.parts[0].done}, clean=True)
    third = Owner(db, "billing", "third")
    (epoch3,) = give(db, "billing", third.member, [0]).values()
    after = third.adopt(0, epoch3)
    assert after is not None and after["charged"] == 0


def test_a_message_that_was_cut_off_max_attempts_times_is_dead_lettered(
    db: psycopg.Connection[Any], topic: str
) -> None:
    owner = owner_of(db, "billing", [0])
    enqueue(db, topic, ["j"])  # "j" is in partition 0 of 2
    tick_now(db, topic)
    (row,) = read_all(owner)
    owner.settle(start=[row])  # ...and the process dies
    killer = Owner(db, "billing", "next")
    (epoch,) = give(db, "billing", killer.member, [0]).values()
    result = killer.adopt(0, epoch, max_attempts=1)
    assert result is not None and result["buried"] == 1
    (dead,) = db.execute("SELECT message_id, reason, attempts FROM pgcg.dead_letters").fetchall()
    assert dead["message_id"] == row.id and "handler never returned" in dead["reason"]


def test_a_stale_epoch_writes_nothing_and_a_fresh_one_everything(
    db: psycopg.Connection[Any], topic: str
) -> None:
    owner = owner_of(db, "billing")
    enqueue(db, topic, [f"k{i}" for i in range(10)])
    tick_now(db, topic)
    rows = read_all(owner)
    stale_epoch = owner.parts[0].epoch
    give(db, "billing", owner.member, [0])  # partition 0 moves on
    answer = owner.settle(done=rows, epoch=None)
    by_partition = {(r["partition"], r["ok"]) for r in answer if r["what"] == "l"}
    assert (0, False) in by_partition and (1, True) in by_partition
    assert all(r["ok"] is False for r in answer if r["what"] == "l" and r["partition"] == 0)
    marks = owner.settle(start=[r for r in rows if r.partition == 0], epoch=stale_epoch)
    assert [m["ok"] for m in marks if m["what"] == "m"] == [False]
    # Nothing of partition 0 was recorded under the stale epoch.
    assert (
        db.execute("SELECT count(*) AS n FROM pgcg.ledger WHERE partition = 0").fetchone()["n"] == 0
    )


@pytest.mark.parametrize("backlog", [20_000])
def test_the_hot_statements_stay_index_driven_at_a_large_backlog(
    db: psycopg.Connection[Any], topic: str, backlog: int
) -> None:
    """Read, settle and adopt at a big backlog (after ANALYZE, as autovacuum would): every
    statement inside the functions reads by index and stays in memory."""
    owner = owner_of(db, "billing")
    for start in range(0, backlog, 5_000):
        enqueue(db, topic, [f"k{i % 500}" for i in range(start, start + 5_000)])
        tick_now(db, topic)
    db.execute("ANALYZE pgcg.log_orders_0")
    owner.adopt(0, owner.parts[0].epoch)
    rows = owner.fetch(limit=200)
    assert len(rows) == 400
    params = owner.params(
        partitions=[0, 1], done=[owner.parts[0].done, owner.parts[1].done],
        cur=[owner.parts[0].cur, owner.parts[1].cur],
        cur_offsets=[owner.parts[0].cur_offset, owner.parts[1].cur_offset],
        limit=200, limit_bytes=1 << 30,
    )  # fmt: skip
    from tests.logclient import Q

    checked = 0
    adopt = owner.params(partition=0, epoch=owner.parts[0].epoch, max_attempts=5, retry_delay_ms=0)
    for query, qparams in ((Q.fetch, params), (Q.adopt, adopt)):
        for plan in nested_plans(db, query, qparams):
            problems = problems_in(db, plan, large=2_000, allow_seq_scan=("topics", "groups"))
            assert not problems, f"{plan['Query Text'][:200]}\n{problems}\n{render(plan)}"
            checked += 1
    assert checked > 3


def test_first_late_answers_as_its_first_version_did(db: psycopg.Connection[Any]) -> None:
    """The fetch's per-tick helper was rewritten in PL/pgSQL (a SQL function re-planned its
    body on every call before PostgreSQL 18). Its answers must not change: compared with
    the first version's body, taken from the migration that made it, on random pairs of
    snapshots (with and without the earlier tick's own xid, and one past the plausible
    span, where it answers from the snapshot alone)."""
    from pgcg.shared.migrate import migrations

    (source,) = [m.sql for m in migrations() if m.name == "topic_logs"]
    start = source.index("CREATE FUNCTION pgcg.first_late(")
    end = source.index("$$;", source.index("AS $$", start)) + 3
    db.execute(source[start:end].replace("pgcg.first_late(", "pg_temp.first_late_v3(", 1))

    rng = random.Random(7)

    def snapshot(xmin: int, xmax: int, running: set[int]) -> str:
        return f"{xmin}:{xmax}:{','.join(map(str, sorted(running)))}"

    cases = []
    for _ in range(2000):
        xmin = rng.randint(100, 200)
        xmax = xmin + rng.randint(0, 20)
        running = {x for x in range(xmin, xmax) if rng.random() < 0.4}
        b_xmin = xmin + rng.randint(0, 10)
        b_xmax = max(b_xmin, xmax + rng.randint(0, 20))
        b_running = {x for x in range(b_xmin, b_xmax) if rng.random() < 0.3}
        a_xid = rng.choice([None, xmax, xmax + rng.randint(1, 5), xmax + 70_000])
        cases.append((snapshot(xmin, xmax, running), a_xid, snapshot(b_xmin, b_xmax, b_running)))
    db.execute("CREATE TEMPORARY TABLE late_cases (a pg_snapshot, a_xid xid8, b pg_snapshot)")
    with db.cursor().copy("COPY late_cases FROM STDIN") as copy:
        for a, a_xid, b in cases:
            copy.write_row((a, None if a_xid is None else str(a_xid), b))
    row = db.execute(
        "SELECT count(*) FILTER (WHERE pgcg.first_late(a, a_xid, b)"
        "                        IS DISTINCT FROM pg_temp.first_late_v3(a, a_xid, b)) AS differ,"
        "       count(pgcg.first_late(a, a_xid, b)) AS answered "
        "FROM late_cases"
    ).fetchone()
    assert row is not None
    assert row["differ"] == 0
    assert 0 < row["answered"] < len(cases)  # both kinds of answer were compared
