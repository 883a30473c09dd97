"""A group through a real PgBouncer in transaction pooling (Debian's 1.18: no prepared
statements in that mode): real coordinator and consumer processes, more clients than
server connections, so transactions hop between server connections as in production.

Skipped only when the pgbouncer binary is absent; .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click.testing
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgcg.bench.pgbouncer import ThrowawayPgBouncer, pgbouncer_binary
from pgcg.shared.errors import ConfigError
from pgcg.shared.pooler import route
from pgcg.shared.settings import Settings
from tests.handlers import JOURNAL_DDL
from tests.helpers import FAST_ENV, pending, wait_for

GROUP, TOPIC = "workers", "jobs"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bouncer(pg_server: str) -> Iterator[ThrowawayPgBouncer]:
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed here (apt-get install pgbouncer; CI installs it)")
    server = conninfo_to_dict(pg_server)
    # Three server connections for a dozen clients: consecutive transactions of one
    # client run on different server connections.
    with ThrowawayPgBouncer(
        str(server.get("host") or "127.0.0.1"), int(server.get("port") or 5432), pool_size=3
    ) as b:
        yield b


def _pooled(bouncer: ThrowawayPgBouncer, dsn: str) -> str:
    return bouncer.url_for(str(conninfo_to_dict(dsn)["dbname"]))


class Process:
    """A `pgcg ...` process with its logs in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgcg.shared.cli", *args],
                cwd=ROOT,
                env={**os.environ, "PGCG_LOG_FORMAT": "json", **FAST_ENV, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def lines(self) -> list[dict[str, Any]]:
        text = self.log.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("action") == action]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(*args: str, **env: str) -> Process:
        started.append(Process(list(args), env, tmp_path / f"process-{len(started)}.log"))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.mark.slow
def test_a_group_runs_through_pgbouncer_in_transaction_mode(
    db: psycopg.Connection[Any],
    dsn: str,
    bouncer: ThrowawayPgBouncer,
    processes: Callable[..., Process],
    cli: Callable[..., click.testing.Result],
) -> None:
    pooled = _pooled(bouncer, dsn)
    db.execute("SELECT pgcg.create_topic(%s, 8)", (TOPIC,))
    db.execute(JOURNAL_DDL)
    session = {"PGCG_DATABASE_URL": pooled, "PGCG_SESSION_DATABASE_URL": dsn}
    coordinators = [processes("coordinator", **session) for _ in range(2)]
    consumer = [
        "consumer",
        "--group",
        GROUP,
        "--topic",
        TOPIC,
        "--handler",
        "tests.handlers:record",
    ]
    common = {"TEST_JOURNAL_URL": dsn, "PGCG_CONCURRENCY": "8", "PGCG_POLL_INTERVAL": "0.5"}
    listening = [processes(*consumer, **session, **common) for _ in range(2)]
    # No session URL: this one cannot LISTEN and polls instead.
    polling = processes(*consumer, PGCG_DATABASE_URL=pooled, **common)
    consumers = [*listening, polling]

    # Through the pooler too, in batches of 20: 30 executions of one statement on one
    # connection, which psycopg would prepare after five.
    total, keys = 600, 30
    lines = "".join(
        json.dumps({"key": f"key-{i % keys}", "payload": {"seq": i}}) + "\n" for i in range(total)
    )
    produced = cli(pooled, "produce", "--topic", TOPIC, "--batch-size", "20", stdin=lines)
    assert produced.exit_code == 0, produced.output
    assert json.loads(produced.output) == {"enqueued": total}

    def handled() -> int:
        row = db.execute(
            "SELECT count(DISTINCT message_id) AS n FROM journal WHERE ended IS NOT NULL"
        )
        return int(row.fetchone()["n"])  # type: ignore[index]

    wait_for(lambda: handled() == total, 90, "every message handled")
    wait_for(lambda: pending(db, TOPIC) == 0, 30, "every message acked")
    pids = {r["pid"] for r in db.execute("SELECT DISTINCT pid FROM journal")}
    assert pids == {c.proc.pid for c in consumers}, "all three consumers took partitions"
    out_of_order = db.execute(
        """
        SELECT key FROM (
            SELECT key, seq, lag(seq) OVER (PARTITION BY key ORDER BY started, entry) AS prev
            FROM journal
        ) j WHERE seq < prev LIMIT 5
        """
    ).fetchall()
    assert out_of_order == []

    # The leader's advisory lock lives on a direct session, not on a server connection
    # PgBouncer shares out.
    leader = db.execute(
        "SELECT l.backend_pid FROM pgcg.coordinator_leader AS l "
        "JOIN pg_locks AS k ON k.pid = l.backend_pid AND k.locktype = 'advisory' "
        "WHERE l.scope = %s",
        (GROUP,),
    ).fetchone()
    assert leader is not None, "a leader holds its lock"
    assert leader["backend_pid"] not in bouncer.server_pids()

    everyone = [*coordinators, *consumers]
    for process in everyone:
        text = process.log.read_text(errors="replace")
        assert "prepared statement" not in text, text[-3000:]
        assert not [line for line in process.lines() if line["level"] in ("error", "critical")]
    assert len(polling.actions("listen_unavailable")) == 1
    assert "PGCG_SESSION_DATABASE_URL" in polling.actions("listen_unavailable")[0]["msg"]
    assert not [c for c in listening if c.actions("listen_unavailable")]
    for process in everyone:
        process.stop()
        assert process.proc.returncode == 0, process.log.read_text()[-3000:]


def test_a_coordinator_refuses_to_lead_through_a_pooler_without_a_session_url(
    dsn: str, bouncer: ThrowawayPgBouncer, processes: Callable[..., Process]
) -> None:
    coordinator = processes("coordinator", PGCG_DATABASE_URL=_pooled(bouncer, dsn))
    assert coordinator.proc.wait(30) == 2
    output = coordinator.log.read_text().strip().splitlines()
    assert len(output) == 1, output
    assert output[0].startswith("pgcg: error: PGCG_DATABASE_URL goes through a transaction pooler")
    assert "PGCG_SESSION_DATABASE_URL" in output[0]


@pytest.mark.anyio
async def test_a_pooler_is_detected_and_the_session_url_must_be_direct(
    dsn: str, bouncer: ThrowawayPgBouncer
) -> None:
    pooled = _pooled(bouncer, dsn)
    assert await route(Settings(), pooled) == route_of(pooled, None, pooled=True)
    assert await route(Settings(), dsn) == route_of(dsn, dsn, pooled=False)
    direct = Settings(session_database_url=dsn)
    assert await route(direct, pooled) == route_of(pooled, dsn, pooled=True)
    # Said outright, nothing is probed: `none` trusts the URL to keep sessions.
    assert await route(Settings(pooler="none"), pooled) == route_of(pooled, pooled, pooled=False)
    assert await route(Settings(pooler="transaction"), dsn) == route_of(dsn, None, pooled=True)
    with pytest.raises(ConfigError, match="PGCG_SESSION_DATABASE_URL goes through a connection"):
        await route(Settings(session_database_url=pooled), pooled)


def route_of(dsn: str, session: str | None, *, pooled: bool) -> Any:
    from pgcg.shared.pooler import Route

    return Route(dsn, session, pooled)
