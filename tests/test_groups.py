"""`pgcg group create | list | delete | seek` against a real PostgreSQL and real consumers:
each group reads the whole log at its own position, seeking is fenced while members run,
and deleting a group frees what only it held back."""

from __future__ import annotations

import collections
import json
from typing import Any

import anyio
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import assign, await_for, fast_settings, owners, running, unfinished
from tests.ops_helpers import fingerprint, log_records, maintain, one_line_error, park

pytestmark = pytest.mark.anyio

TOPIC = "orders"


def settings(**overrides: Any) -> Any:
    return fast_settings({"drain_deadline": 2, "retry_base": 0.05, "retry_max": 0.2}, overrides)


def produce(db: psycopg.Connection[Any], *keys: str, topic: str = TOPIC) -> list[int]:
    done = enqueue_many_sync(db, topic, [OutgoingMessage(k, {"k": k}) for k in keys])
    return [e.id for e in done]  # type: ignore[misc]


class Recorder:
    """Records every handling; notices two handlings of one key at once."""

    def __init__(self) -> None:
        self.handled: list[Message] = []
        self.active: collections.Counter[str] = collections.Counter()
        self.overlaps: list[str] = []
        self.gate: dict[int, anyio.Event] = {}  # message id -> wait for it before returning
        self.started: list[int] = []

    async def __call__(self, message: Message) -> None:
        self.active[message.key] += 1
        if self.active[message.key] > 1:
            self.overlaps.append(message.key)
        self.started.append(message.id)
        try:
            if message.id in self.gate:
                await self.gate[message.id].wait()
            self.handled.append(message)
        finally:
            self.active[message.key] -= 1

    def ids(self) -> list[int]:
        return [m.id for m in self.handled]


async def run_cli(cli: Any, dsn: str, *args: str) -> Any:
    """A `pgcg` command from a thread: the consumers in this event loop keep running."""
    return await anyio.to_thread.run_sync(lambda: cli(dsn, *args))


def consumer(dsn: str, group: str, handler: Any, **overrides: Any) -> Consumer:
    return Consumer(settings(**overrides), group=group, topic=TOPIC, handler=handler, dsn=dsn)


# -- create, list, delete ------------------------------------------------------------------


async def test_create_list_delete(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    produce(db, "a", "b", "c")
    created = cli(dsn, "group", "create", "billing", "--topic", TOPIC)
    assert created.exit_code == 0, created.output
    assert created.stdout.strip() == "group billing created on topic orders, from earliest"
    assert cli(dsn, "group", "create", "audit", "--topic", TOPIC, "--from", "latest").exit_code == 0
    exists = cli(dsn, "group", "create", "audit", "--topic", TOPIC, "--if-not-exists")
    assert exists.exit_code == 0 and "group audit exists on topic orders" in exists.stdout
    db.execute(
        "INSERT INTO pgcg.consumer_groups (group_name, member_id, host, pid, session_timeout_ms, "
        "protocol) VALUES ('billing', 'm-1', 'h', 1, 10000, 3)"
    )

    table = cli(dsn, "group", "list")
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["GROUP", "TOPIC", "MEMBERS", "LAG", "OLDEST", "PARKED"]
    listed = {r.split()[0]: r.split() for r in rows}
    assert listed["billing"][1:4] == ["orders", "1", "3"]  # every message still to read
    assert listed["audit"][1:5] == ["orders", "0", "0", "-"]  # created after them
    as_json = [json.loads(line) for line in cli(dsn, "group", "list", "--json").stdout.splitlines()]
    assert [(g["group_name"], g["members"], g["lag"]) for g in as_json] == [
        ("audit", 0, 0),
        ("billing", 1, 3),
    ]
    assert as_json[1]["oldest_age_s"] > 0  # no tick after the position yet: from the log
    only = cli(dsn, "group", "list", "--topic", "nope")
    assert only.exit_code == 0 and len(only.stdout.splitlines()) == 1  # the header

    refused = one_line_error(cli(dsn, "group", "delete", "billing"))
    assert "has live members" in refused and "--force" in refused
    assert cli(dsn, "group", "delete", "audit").stdout.strip() == "group audit deleted"
    forced = cli(dsn, "group", "delete", "billing", "--force")
    assert forced.exit_code == 0, forced.output
    assert db.execute("SELECT * FROM pgcg.groups").fetchall() == []
    assert db.execute("SELECT * FROM pgcg.partition_assignments").fetchall() == []
    assert db.execute("SELECT * FROM pgcg.consumer_groups").fetchall() == []
    assert db.execute("SELECT * FROM pgcg.group_progress").fetchall() == []
    one_line_error(cli(dsn, "group", "delete", "billing"), code=3)


async def test_delete_keeps_dead_letters_and_says_so(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    db.execute(
        "INSERT INTO pgcg.dead_letters (message_id, topic, partition, key, payload, headers, "
        "enqueued_at, attempts, group_name) VALUES (1, %s, 1, 'k', '{}', '{}', now(), 3, "
        "'billing')",
        (TOPIC,),
    )
    done = cli(dsn, "group", "delete", "billing")
    assert "its 1 dead letter(s) stay until `pgcg dlq purge --group billing`" in done.stdout


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["create", "g", "--topic", TOPIC, "--from", "yesterday"], "--from 'yesterday'", 2),
        (["create", "g", "--topic", TOPIC, "--from", "3:1024"], "is not a position", 2),
        (["create", "bad name", "--topic", TOPIC], "invalid group name 'bad name'", 2),
        (["create", "g", "--topic", "Bad"], "invalid topic name 'Bad'", 2),
        (["create", "g"], "Missing option '--topic'", 2),
        (["create", "g", "--topic", "nope"], "pgcg topic create nope", 3),
        (["create", "billing", "--topic", "other"], "group billing consumes topic orders", 2),
        (["create", "billing", "--topic", TOPIC], "already exists", 2),
        (["seek", "billing"], "Missing option '--to'", 2),
        (["seek", "billing", "--to", "soon"], "--to 'soon' is not a position", 2),
        (["seek", "billing", "--to", "1:99999999999999999999"], "is not a position", 2),
        (["seek", "billing", "--to", "4096:1"], "no topic has a partition 4096", 2),
        (["seek", "billing", "--to", "1:2048"], "message 2048 is not in partition 1", 2),
        (["seek", "billing", "--to", "1:1048577"], "is not retained", 2),
        (["seek", "nope", "--to", "latest"], "unknown group 'nope'", 3),
        (["seek", "bad name", "--to", "latest"], "invalid group name", 2),
        (["delete", "nope"], "unknown group 'nope'", 3),
        (["delete", "bad/name"], "invalid group name", 2),
    ],
)  # fmt: skip
async def test_bad_input_is_one_line_and_writes_nothing(
    db: psycopg.Connection[Any], dsn: str, cli: Any, args: list[str], needle: str, code: int
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    db.execute("SELECT pgcg.create_topic('other', 2)")
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    produce(db, "a", "b")
    before = fingerprint(db)
    error = one_line_error(cli(dsn, "group", *args), code=code)
    assert needle in error
    assert fingerprint(db) == before


# -- where a group starts --------------------------------------------------------------------


async def test_from_latest_skips_earlier_messages_and_earliest_gets_them(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    before = produce(db, "a", "b", "c")
    assert cli(dsn, "group", "create", "late", "--topic", TOPIC, "--from", "latest").exit_code == 0
    assert cli(dsn, "group", "create", "early", "--topic", TOPIC).exit_code == 0
    after = produce(db, "a", "d")
    late, early = Recorder(), Recorder()
    a, b = consumer(dsn, "late", late), consumer(dsn, "early", early)
    async with running(a, b):
        assign(db, "late", TOPIC, [0, 1], a.member_id)
        assign(db, "early", TOPIC, [0, 1], b.member_id)
        await await_for(lambda: sorted(early.ids()) == sorted(before + after), what="early done")
        await await_for(lambda: sorted(late.ids()) == sorted(after), what="late done")
        await await_for(lambda: unfinished(db, "late") == 0, what="late's results written")
    assert not set(late.ids()) & set(before)


async def test_from_a_timestamp(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    produce(db, "old")
    # A tick after the old message, so a position can be placed between the two.
    db.execute("SELECT pgcg.tick_now(id) FROM pgcg.topics WHERE name = %s", (TOPIC,))
    (cut,) = db.execute("SELECT now() AS at").fetchone().values()  # type: ignore[union-attr]
    (new,) = produce(db, "new")
    done = cli(dsn, "group", "create", "since", "--topic", TOPIC, "--from", cut.isoformat())
    assert done.exit_code == 0, done.output
    recorder = Recorder()
    member = consumer(dsn, "since", recorder)
    async with running(member):
        assign(db, "since", TOPIC, [0], member.member_id)
        await await_for(lambda: recorder.ids() == [new], what="only the new message")
        await await_for(lambda: unfinished(db, "since") == 0, what="nothing else to do")


# -- seek --------------------------------------------------------------------------------------


async def test_seek_to_earliest_while_a_consumer_runs_handles_everything_again(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    # Imported here: the lowest-versions run collects this module without the OTel SDK.
    pytest.importorskip("opentelemetry.sdk")
    from tests import otel

    otel_data = otel.install()
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    ids = produce(db, *[f"k{i % 4}" for i in range(12)])
    recorder = Recorder()
    member = consumer(dsn, "billing", recorder)
    async with running(member):
        assign(db, "billing", TOPIC, [0, 1], member.member_id)
        await await_for(lambda: sorted(recorder.ids()) == sorted(ids), what="first pass")
        await await_for(lambda: unfinished(db, "billing") == 0, what="first pass recorded")
        epochs = {p: e for p, (_, e, _) in owners(db, "billing").items()}

        done = await run_cli(cli, dsn, "group", "seek", "billing", "--to", "earliest")
        assert done.exit_code == 0, done.output
        assert done.stdout.strip() == (
            "group billing moved to earliest in 2 partition(s): 12 message(s) to read, "
            "0 parked message(s) dropped"
        )
        # The member keeps its partitions, under new epochs, and reads them again.
        after = owners(db, "billing")
        assert {p: (m, e) for p, (m, e, _) in after.items()} == {
            p: (member.member_id, epochs[p] + 1) for p in (0, 1)
        }
        await await_for(lambda: len(recorder.handled) == 24, what="second pass")
        await await_for(lambda: unfinished(db, "billing") == 0, what="second pass recorded")
    assert collections.Counter(recorder.ids()) == {i: 2 for i in ids}
    assert not recorder.overlaps
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for m in recorder.handled[12:]:
        by_key[m.key].append(m.id)
    assert all(seq == sorted(seq) for seq in by_key.values())

    (record,) = log_records(done, "group_seek")
    assert (record["group"], record["topic"], record["to"], record["dropped"]) == (
        "billing", TOPIC, "earliest", 0,
    )  # fmt: skip
    assert [(p["partition"], p["dropped"]) for p in record["partitions"]] == [(0, 0), (1, 0)]
    assert sum(p["lag"] for p in record["partitions"]) == 12
    (span,) = otel_data.finished("pgcg group seek", **{"messaging.consumer.group.name": "billing"})
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == TOPIC
    assert span.attributes["pgcg.seek.to"] == "earliest"
    assert span.attributes["pgcg.seek.partitions"] == 2
    assert record["trace_id"] == format(span.context.trace_id, "032x")


async def test_seek_to_latest_fences_a_running_handler(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    """A handler is running when the group moves past its message: its result must not be
    recorded under the new position, and nothing before the seek is handled again."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    blocked, *behind = produce(db, "k", "k", "k")
    recorder = Recorder()
    recorder.gate[blocked] = anyio.Event()
    member = consumer(dsn, "billing", recorder)
    async with running(member):
        assign(db, "billing", TOPIC, [0], member.member_id)
        await await_for(lambda: blocked in recorder.started, what="the handler running")
        done = await run_cli(cli, dsn, "group", "seek", "billing", "--to", "latest")
        assert done.exit_code == 0, done.output
        recorder.gate[blocked].set()
        (fresh,) = produce(db, "k")
        await await_for(lambda: fresh in recorder.ids(), what="the message after the seek")
        await await_for(lambda: unfinished(db, "billing") == 0, what="nothing left to do")
    # The blocked handler finished (its result fenced); nothing skipped by the seek ran.
    assert not set(recorder.started) & set(behind)
    assert recorder.started.count(blocked) == 1
    assert not recorder.overlaps


async def test_seek_to_a_message_resumes_with_it(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    ids = produce(db, *"abcdef")
    recorder = Recorder()
    member = consumer(dsn, "billing", recorder)
    async with running(member):
        assign(db, "billing", TOPIC, [0], member.member_id)
        await await_for(lambda: sorted(recorder.ids()) == ids, what="first pass")
        done = await run_cli(cli, dsn, "group", "seek", "billing", "--to", f"0:{ids[3]}")
        assert done.exit_code == 0, done.output
        await await_for(lambda: len(recorder.handled) == 9, what="from the fourth on")
        await await_for(lambda: unfinished(db, "billing") == 0, what="recorded")
    assert sorted(recorder.ids()[6:]) == ids[3:]


async def test_seek_drops_parked_messages(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('audit', %s)", (TOPIC,))
    park(db, "billing", 0, 5, "k")
    park(db, "billing", 1, 6, "j")
    park(db, "audit", 1, 6, "j")
    done = cli(dsn, "group", "seek", "billing", "--to", "latest", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert (result["dropped"], [p["dropped"] for p in result["partitions"]]) == (2, [1, 1])
    left = db.execute(
        "SELECT g.group_name FROM pgcg.parked AS pk JOIN pgcg.groups AS g ON g.id = pk.group_id"
    ).fetchall()
    assert [r["group_name"] for r in left] == ["audit"]  # another group's are its own


# -- deleting frees storage ------------------------------------------------------------------


async def test_deleting_a_group_frees_what_only_it_held(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    """Two groups; one reads everything, the other never runs. The oldest segment is due and
    only the idle group still needs it: upkeep keeps it until that group is deleted."""
    done = cli(dsn, "topic", "create", TOPIC, "--partitions", "1", "--segments", "3",
               "--retention", "0", "--segment-bytes", "1B")  # fmt: skip
    assert done.exit_code == 0, done.output
    db.execute("SELECT pgcg.create_group('busy', %s)", (TOPIC,))
    db.execute("SELECT pgcg.create_group('idle', %s)", (TOPIC,))
    first = produce(db, "a", "b", "c")
    recorder = Recorder()
    member = consumer(dsn, "busy", recorder)
    async with running(member):
        assign(db, "busy", TOPIC, [0], member.member_id)
        await await_for(lambda: sorted(recorder.ids()) == sorted(first), what="busy read it")
        # Rotate and seal segment 0: the next messages go to segment 1.
        await await_for(
            lambda: ("sealed", 0, None, None) in maintain(db, TOPIC), what="segment 0 sealed"
        )
        later = produce(db, "d")  # read by busy: a tick after the seal, and busy past it
        await await_for(lambda: later[0] in recorder.ids(), what="busy read past the seal")

        def holders() -> set[str] | None:
            events = maintain(db, TOPIC)
            if ("reclaimed", 0, None, None) in events:
                return None
            held = {g for e, s, g, _ in events if e == "held" and s == 0}
            return held if held == {"idle"} else set()

        assert await await_for(holders, what="only idle holding segment 0") == {"idle"}
        shown = await run_cli(cli, dsn, "status", "--group", "busy", "--json")
        status = json.loads(shown.stdout)
        (topic,) = status["topics"]
        held = topic["holding_back"]
        assert (held["segment"], held["reason"]) == (0, "groups")
        assert [g["group"] for g in held["groups"]] == ["idle"]
        assert held["groups"][0]["lag"] == 4

        assert (await run_cli(cli, dsn, "group", "delete", "idle")).exit_code == 0
        assert ("reclaimed", 0, None, None) in maintain(db, TOPIC)
    stored = db.execute(
        "SELECT count(*) AS n FROM pgcg.log_orders_0"  # segment 0's slot table
    ).fetchone()
    assert stored is not None and stored["n"] == 0
