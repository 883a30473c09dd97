"""Real `pgcg consumer` processes: two members share a topic; SIGTERM drains cleanly.

The handler (tests/handlers.py) journals every handling in the database, so what is
checked is what the processes did, not what they logged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.handlers import JOURNAL_DDL
from tests.helpers import assign, owners, parked, pending, unfinished_ids, wait_for

pytestmark = pytest.mark.slow

GROUP = "workers"
TOPIC = "jobs"
ROOT = Path(__file__).resolve().parent.parent


class Member:
    """One `pgcg consumer` process, its logs in files (a pipe could fill up and block it)."""

    def __init__(self, dsn: str, logs: Path, **env: str) -> None:
        self.stdout = logs.with_suffix(".out")
        self.stderr = logs.with_suffix(".err")
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgcg.shared.cli", "consumer", "--group", GROUP,
                 "--topic", TOPIC, "--handler", "tests.handlers:record"],
                cwd=ROOT,
                env={**os.environ, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json",
                     "PGCG_HEARTBEAT_INTERVAL": "1", "PGCG_SESSION_TIMEOUT": "10", **env},
                stdout=out,
                stderr=err,
            )  # fmt: skip

    def member_id(self, db: psycopg.Connection[Any]) -> str | None:
        row = db.execute(
            "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s AND pid = %s",
            (GROUP, self.proc.pid),
        ).fetchone()
        return row["member_id"] if row else None

    def joined(self, db: psycopg.Connection[Any]) -> str:
        return wait_for(lambda: self.member_id(db), what=f"pid {self.proc.pid} joined")  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self) -> list[dict[str, Any]]:
        lines = self.stderr.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def members(dsn: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Member] = []

    def start(**env: str) -> Member:
        member = Member(dsn, tmp_path / f"member{len(started)}", **env)
        started.append(member)
        return member

    try:
        yield start
    finally:
        for member in started:
            member.kill()


def setup(db: psycopg.Connection[Any], partitions: int) -> None:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, partitions))
    db.execute(JOURNAL_DDL)


def journaled(db: psycopg.Connection[Any], where: str = "true") -> int:
    return int(db.execute(f"SELECT count(*) AS n FROM journal WHERE {where}").fetchone()["n"])  # type: ignore[index]


def test_two_members_drain_a_topic_exactly_once_in_key_order(
    db: psycopg.Connection[Any], dsn: str, members: Any
) -> None:
    setup(db, partitions=16)
    total, keys = 10_000, 200
    enqueue_many_sync(
        db, TOPIC, [OutgoingMessage(f"key-{i % keys}", {"seq": i}) for i in range(total)]
    )
    a, b = members(PGCG_CONCURRENCY="20"), members(PGCG_CONCURRENCY="20")
    assign(db, GROUP, TOPIC, list(range(8)), a.joined(db))
    assign(db, GROUP, TOPIC, list(range(8, 16)), b.joined(db))

    wait_for(lambda: journaled(db, "ended IS NOT NULL") >= total, 90, "every message handled")
    wait_for(lambda: pending(db, TOPIC) == 0, 20, "every message acked")
    assert (a.stop(), b.stop()) == (0, 0)

    # exactly once
    assert journaled(db) == total
    assert journaled(db, "attempt <> 1") == 0
    ids = db.execute("SELECT count(DISTINCT message_id) AS n FROM journal").fetchone()
    assert ids == {"n": total}
    # both members worked, each key on one member only (nobody moved partitions)
    per_pid = db.execute("SELECT pid, count(*) AS n FROM journal GROUP BY pid").fetchall()
    assert {r["pid"] for r in per_pid} == {a.proc.pid, b.proc.pid}
    split = db.execute("SELECT key FROM journal GROUP BY key HAVING count(DISTINCT pid) > 1")
    assert split.fetchall() == []
    # per key: handled in seq order, and each handling ended before the next one started
    violations = db.execute(
        """
        SELECT key, seq, prev_seq, started, prev_ended FROM (
            SELECT key, seq, started,
                   lag(seq) OVER w AS prev_seq, lag(ended) OVER w AS prev_ended
            FROM journal WINDOW w AS (PARTITION BY key ORDER BY started, entry)
        ) j
        WHERE prev_seq IS NOT NULL AND (seq < prev_seq OR started < prev_ended)
        LIMIT 5
        """
    ).fetchall()
    assert violations == []


def test_sigterm_finishes_in_flight_work_releases_and_leaves(
    db: psycopg.Connection[Any], dsn: str, members: Any
) -> None:
    setup(db, partitions=4)
    total = 40
    enqueue_many_sync(
        db, TOPIC, [OutgoingMessage(f"key-{i % 8}", {"seq": i}) for i in range(total)]
    )
    member = members(PGCG_CONCURRENCY="4", TEST_HANDLER_HOLD="0.5")
    member_id = member.joined(db)
    assign(db, GROUP, TOPIC, [0, 1, 2, 3], member_id)
    epochs = {p: epoch for p, (_, epoch, _) in owners(db, GROUP).items()}

    wait_for(lambda: journaled(db, "ended IS NULL") > 0, what="a handler in flight")
    assert member.stop() == 0
    started_before_stop = journaled(db)

    # every handling that started also finished, and its message was recorded finished
    assert started_before_stop > 0
    assert journaled(db, "ended IS NULL") == 0
    handled = {r["message_id"] for r in db.execute("SELECT message_id FROM journal")}
    assert not handled & unfinished_ids(db, GROUP)
    assert journaled(db, "attempt <> 1") == 0
    # nothing else was touched: the rest is pending, in the log, for the next owner; none
    # of it parked, and the release was clean (the next owner charges no delivery)
    assert pending(db, TOPIC) == total - started_before_stop
    assert parked(db, GROUP) == []
    clean = db.execute(
        "SELECT gp.partition, gp.clean_epoch FROM pgcg.group_progress AS gp "
        "JOIN pgcg.groups AS g ON g.id = gp.group_id WHERE g.group_name = %s",
        (GROUP,),
    ).fetchall()
    assert {r["partition"]: r["clean_epoch"] for r in clean} == epochs
    # partitions released under a new epoch, member gone
    assert owners(db, GROUP) == {p: (None, epochs[p] + 1, "unassigned") for p in range(4)}
    assert member.member_id(db) is None

    logged = member.logs()
    acts = [line.get("action") for line in logged]
    assert "shutdown_requested" in acts and "consumer_stopped" in acts
    assert acts.index("shutdown_requested") < acts.index("consumer_stopped")
    released = [line for line in logged if line.get("action") == "partition_released"]
    assert sorted(line["partition"] for line in released) == [0, 1, 2, 3]
    assert all(line["reason"] == "shutdown" and not line["fenced"] for line in released)
    assert all(line.get("member_id") == member_id for line in released)
    assert not [line for line in logged if line["level"] in ("error", "critical")]


def test_sigusr1_logs_where_every_task_waits_and_the_member_goes_on(
    db: psycopg.Connection[Any], members: Any
) -> None:
    setup(db, partitions=2)
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"key-{i}", {"seq": i}) for i in range(4)])
    member = members(TEST_HANDLER_HOLD="30")
    member_id = member.joined(db)
    assign(db, GROUP, TOPIC, [0, 1], member_id)
    wait_for(lambda: journaled(db, "ended IS NULL") > 0, what="a handler in flight")

    member.proc.send_signal(signal.SIGUSR1)

    def stacks() -> list[str]:
        return [r["stack"] for r in member.logs() if r.get("action") == "task_stack"]

    dumped = wait_for(lambda: [s for s in stacks() if "Reader.run" in s], what="task stacks")
    # The chain of awaits, not just the task's own frame: the reader's loop and, in
    # another task, the handler itself where it waits.
    assert any("\n" in s for s in dumped)
    assert any("tests/handlers.py" in s for s in stacks())
    assert member.member_id(db) == member_id  # a dump changes nothing
    assert member.stop() == 0


def test_sigusr1_while_a_consumer_is_still_connecting_shows_it_and_ends_nothing(
    members: Any,
) -> None:
    # A server that accepts and never answers: the consumer stays in its first connect,
    # which is when an operator most wants to see where it waits.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        port = silent.getsockname()[1]
        member = members(PGCG_DATABASE_URL=f"postgresql://pgcg@127.0.0.1:{port}/pgcg")
        accepted, _ = silent.accept()  # it is past its start-up: connecting
        with accepted:
            member.proc.send_signal(signal.SIGUSR1)
            dumped = wait_for(
                lambda: [r for r in member.logs() if r.get("action") == "task_stack"],
                what="task stacks while connecting",
            )
            assert member.proc.poll() is None  # SIGUSR1's default action would have ended it
            assert any("connect" in (r.get("stack") or "") for r in dumped)
