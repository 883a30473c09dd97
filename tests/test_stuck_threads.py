"""A plain `def` handler's thread cannot be cancelled (nor an async handler that ignores its
cancellation): while it runs, its partition is not released, and if it outlives the drain
deadline the process exits (code 6) before its lease ends instead of letting a second
member work on the same keys.

Real `pgcg consumer` processes; the handler (tests/blocking_handlers.py) blocks until the
test creates a file, which it does only after the process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcg.bench.chaos.netproxy import ProxyHub
from pgcg.consumer.assignment import EXIT_HANDLER_STUCK
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries
from tests.helpers import assign, key_in, owners, wait_for

pytestmark = pytest.mark.slow

GROUP = "stuck"
TOPIC = "jobs"
ROOT = Path(__file__).resolve().parent.parent
COORD = Queries("coordinator")


class Member:
    def __init__(self, dsn: str, folder: Path, handler: str = "block") -> None:
        self.folder = folder
        self.stderr = folder / "member.err"
        with open(folder / "member.out", "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgcg.shared.cli", "consumer", "--group", GROUP,
                 "--topic", TOPIC, "--handler", f"tests.blocking_handlers:{handler}"],
                cwd=ROOT,
                env={**os.environ, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json",
                     "PGCG_HEARTBEAT_INTERVAL": "0.5", "PGCG_SESSION_TIMEOUT": "4",
                     "PGCG_DRAIN_DEADLINE": "3", "PGCG_TEST_DIR": str(folder)},
                stdout=out,
                stderr=err,
            )  # fmt: skip

    def joined(self, db: psycopg.Connection[Any]) -> str:
        def member_id() -> str | None:
            row = db.execute(
                "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s AND pid = %s",
                (GROUP, self.proc.pid),
            ).fetchone()
            return row["member_id"] if row else None

        return wait_for(member_id, 30, f"pid {self.proc.pid} joined")  # type: ignore[no-any-return]

    def actions(self) -> list[str]:
        lines = self.stderr.read_text().splitlines()
        return [json.loads(line).get("action", "") for line in lines if line.startswith("{")]


def stopped(member: Member) -> None:
    (member.folder / "release").touch()
    if member.proc.poll() is None:
        member.proc.kill()
    member.proc.wait()


@pytest.fixture(params=["block", "stubborn"])
def member(dsn: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Member]:
    """A member whose handler will not stop: a `def` handler's thread (block), or an
    async handler that ignores its cancellation (stubborn)."""
    started = Member(dsn, tmp_path, request.param)
    try:
        yield started
    finally:
        stopped(started)


def handling(db: psycopg.Connection[Any], member: Member) -> tuple[str, int]:
    """The member owns partition 0 and its handler thread is blocked on a message."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    member_id = member.joined(db)
    assign(db, GROUP, TOPIC, [0], member_id)
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(key_in(0, 1), {"n": 1})])
    wait_for(lambda: (member.folder / "started-0").exists(), 30, "the handler to start")
    return member_id, owners(db, GROUP)[0][1]


def test_a_revoked_partition_is_kept_while_its_handler_thread_runs(
    db: psycopg.Connection[Any], member: Member
) -> None:
    member_id, epoch = handling(db, member)
    db.execute(
        COORD.revoke,
        {"group": GROUP, "topic": TOPIC, "partitions": [0], "targets": ["someone-else"],
         "drain_deadline_s": 3},
    )  # fmt: skip
    db.execute(COORD.notify_group, {"group": GROUP})
    code = member.proc.wait(60)
    # Before the leader could force the hand-off: nobody else may have had the keys yet.
    row = db.execute(
        "SELECT member_id, epoch, state, revoke_deadline > clock_timestamp() AS in_time "
        "FROM pgcg.partition_assignments WHERE group_name = %s AND partition = 0",
        (GROUP,),
    ).fetchone()
    assert code == EXIT_HANDLER_STUCK, member.stderr.read_text()[-2000:]
    assert row == {"member_id": member_id, "epoch": epoch, "state": "revoking", "in_time": True}
    actions = member.actions()
    assert "handler_thread_stuck" in actions
    assert "partition_released" not in actions


def test_shutdown_with_a_handler_thread_running_exits_without_releasing(
    db: psycopg.Connection[Any], member: Member
) -> None:
    member_id, epoch = handling(db, member)
    member.proc.send_signal(signal.SIGTERM)
    code = member.proc.wait(60)
    assert code == EXIT_HANDLER_STUCK, member.stderr.read_text()[-2000:]
    # Not released, not left: the partition waits for the member's session to time out.
    assert owners(db, GROUP)[0] == (member_id, epoch, "assigned")
    actions = member.actions()
    assert "handler_thread_stuck" in actions
    assert "partition_released" not in actions


def test_a_lease_that_runs_out_under_a_handler_thread_stops_the_process(
    db: psycopg.Connection[Any], dsn: str, pg_server: str, tmp_path: Path
) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_server)
    with ProxyHub() as hub:
        proxy = hub.proxy(str(params["host"]), int(params["port"]))
        member = Member(proxy.dsn_for(dsn), tmp_path)
        try:
            member_id, epoch = handling(db, member)
            # The database is out of reach (packets dropped): the lease runs out while the
            # handler's thread still works on the partition's keys.
            proxy.stall(3600)
            code = member.proc.wait(60)
        finally:
            stopped(member)
    assert code == EXIT_HANDLER_STUCK, member.stderr.read_text()[-2000:]
    assert owners(db, GROUP)[0] == (member_id, epoch, "assigned")
    actions = member.actions()
    assert "lease_expired" in actions
    assert "handler_thread_stuck" in actions
