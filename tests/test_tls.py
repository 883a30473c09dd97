"""TLS end to end: a PostgreSQL that only takes TLS with a client certificate, both from a
throwaway CA; a coordinator, a consumer and a producer run against it in verify-full, and
every wrong setting (another CA, another host name, no client certificate, no TLS) is
refused with one line and exit 2."""

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

# The certificates come from the test extra's cryptography; the lowest-versions run lacks it.
pytest.importorskip("cryptography")
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from pgcg.bench.chaos.netproxy import ProxyHub
from pgcg.bench.throwaway import ThrowawayPostgres
from pgcg.bench.tls import CertificateAuthority
from pgcg.shared.cli import main
from pgcg.shared.migrate import migrate
from tests.handlers import JOURNAL_DDL
from tests.helpers import FAST_ENV, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOPIC, GROUP, MESSAGES = "orders", "billing", 40


@pytest.fixture(scope="module")
def server() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres(tls=True) as pg:
        migrate(pg.url)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
            conn.execute(JOURNAL_DDL)
        yield pg


def _process(args: list[str], dsn: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgcg.shared.cli", *args],
        env={**os.environ, **FAST_ENV, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json"},
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw,
    )  # fmt: skip


def test_coordinator_consumer_and_producer_in_verify_full(server: ThrowawayPostgres) -> None:
    dsn = server.url
    assert "sslmode=verify-full" in dsn and "sslrootcert=" in dsn and "sslcert=" in dsn
    coordinator = _process(["coordinator"], dsn)
    consumer = _process(["consumer", "--group", GROUP, "--topic", TOPIC,
                         "--handler", "tests.handlers:record"], dsn)  # fmt: skip
    try:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as db:
            wait_for(
                lambda: db.execute(
                    "SELECT count(*) = 4 AS ok FROM pgcg.partition_assignments "
                    "WHERE group_name = %s AND state = 'assigned'",
                    (GROUP,),
                ).fetchone()["ok"],  # type: ignore[index]
                60, "the consumer holds every partition",
            )  # fmt: skip
            lines = "".join(
                json.dumps({"key": f"k{i % 7}", "payload": {"seq": i}}) + "\n"
                for i in range(MESSAGES)
            )
            producer = subprocess.run(
                [sys.executable, "-m", "pgcg.shared.cli", "produce", "--topic", TOPIC],
                input=lines, capture_output=True, text=True, timeout=60, cwd=ROOT,
                env={**os.environ, "PGCG_DATABASE_URL": dsn},
            )  # fmt: skip
            assert producer.returncode == 0, producer.stderr
            wait_for(
                lambda: db.execute("SELECT count(DISTINCT message_id) AS n FROM journal")
                .fetchone()["n"] == MESSAGES,  # type: ignore[index]
                60, "every message handled",
            )  # fmt: skip
            # Every TCP session is TLS with a client certificate, ours included.
            sessions = db.execute(
                "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a "
                "JOIN pg_stat_ssl s USING (pid) WHERE a.client_addr IS NOT NULL"
            ).fetchall()
            names = {s["application_name"] for s in sessions}
            assert {"pgcg-coordinator", "pgcg-fetcher", "pgcg-acker"} <= names, names
            assert all(s["ssl"] and s["client_dn"] == "/CN=postgres" for s in sessions)
    finally:
        for proc in (consumer, coordinator):
            proc.send_signal(signal.SIGTERM)
        outcomes = [proc.communicate(timeout=60) for proc in (consumer, coordinator)]
    assert (consumer.returncode, coordinator.returncode) == (0, 0), outcomes


def test_verify_full_through_the_chaos_proxy(server: ThrowawayPostgres) -> None:
    """The proxy's DSN keeps the host name, so the certificate is still checked against it."""
    with ProxyHub() as hub:
        proxy = hub.proxy("127.0.0.1", server.port)
        with psycopg.connect(proxy.dsn_for(server.url), connect_timeout=5) as conn:
            row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
        assert proxy.connections == 1


def _variants(server: ThrowawayPostgres, tmp: Path) -> dict[str, tuple[str, str]]:
    """Wrong settings -> (DSN, what the one error line must say)."""
    other_ca = CertificateAuthority(tmp / "other", "another CA")
    url = server.url
    return {
        "another CA": (make_conninfo(url, sslrootcert=str(other_ca.cert)),
                       "the server's TLS certificate was refused"),
        "another host name": (make_conninfo(url, host="db.example", hostaddr="127.0.0.1"),
                              "the server's TLS certificate was refused"),
        "no client certificate": (make_conninfo(url, sslcert="", sslkey=""),
                                  "the server wants a client certificate"),
        "a client certificate from another CA": (
            make_conninfo(url, sslcert=str(other_ca.issue("postgres", client=True).cert),
                          sslkey=str(tmp / "other" / "client-postgres.key")),
            "the server wants a client certificate"),
        "no TLS": (make_conninfo(url, sslmode="disable"), "refuses connections without TLS"),
        "a CA file that is not there": (make_conninfo(url, sslrootcert=str(tmp / "none.crt")),
                                        "a TLS file in PGCG_DATABASE_URL cannot be used"),
    }  # fmt: skip


def test_wrong_tls_settings_are_one_line_exit_2(server: ThrowawayPostgres, tmp_path: Path) -> None:
    for what, (dsn, needle) in _variants(server, tmp_path).items():
        for args in (["status"], ["produce", "--topic", TOPIC, "--key", "k", "--payload", "{}"]):
            result = CliRunner().invoke(main, args, env={"PGCG_DATABASE_URL": dsn})
            assert result.exit_code == 2, (what, result.output)
            assert needle in result.output, (what, result.output)
            assert len(result.output.strip().splitlines()) == 1, (what, result.output)


def test_a_coordinator_and_a_consumer_refuse_another_ca(
    server: ThrowawayPostgres, tmp_path: Path
) -> None:
    dsn, needle = _variants(server, tmp_path)["another CA"]
    for args in (["coordinator"], ["consumer", "--group", GROUP, "--topic", TOPIC,
                                   "--handler", "tests.handlers:record"]):  # fmt: skip
        proc = _process(args, dsn)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, stderr[-3000:]
        assert "Traceback" not in stderr
        (line,) = [x for x in stderr.splitlines() if x.startswith("pgcg: error:")]
        assert needle in line and "certificate verify failed" in line
