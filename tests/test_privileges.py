"""A role missing a privilege gets one line naming the privilege and the object, exit 2,
never a traceback: coordinator and consumer processes run as real non-superuser roles. A
consumer holds only EXECUTE on its functions and a binding to its group; a coordinator the
table privileges docs/security.md lists (tests/test_roles.py proves the isolation)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result

from pgcg.shared.db import connect_sync
from pgcg.shared.errors import PermissionDenied
from pgcg.shared.grants import CONSUMER_FUNCTIONS, COORDINATOR_FUNCTIONS, NEEDS
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.conftest import FULL_GRANTS
from tests.helpers import FAST_ENV, assign, unfinished, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "orders"
GROUP = "billing"


def _start(kind: list[str], dsn: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgcg.shared.cli", *kind],
        env={**os.environ, **FAST_ENV, "PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json",
             **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, cwd=ROOT,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running after {timeout}s:\n{err[-3000:]}") from None
    return proc.returncode, err


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("pgcg: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _setup(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    enqueue_many_sync(db, TOPIC, [OutgoingMessage(f"k{i}", {}) for i in range(4)])


def test_a_coordinator_without_select_on_group_progress(
    db: psycopg.Connection[Any], make_role: Callable[..., str]
) -> None:
    """Topic upkeep reads every group's position before it lets a segment go."""
    _setup(db)
    dsn = make_role(*FULL_GRANTS, "REVOKE SELECT ON pgcg.group_progress FROM {role}")
    code, stderr = _finish(_start(["coordinator"], dsn))
    line = _error_line(stderr)
    assert code == 2, stderr[-3000:]
    assert "permission denied for table group_progress" in line and "docs/security.md" in line
    assert "coordinators GRANT SELECT, UPDATE ON pgcg.group_progress" in line


def test_a_consumer_without_execute_on_settle(
    db: psycopg.Connection[Any], make_role: Callable[..., str]
) -> None:
    """Nothing starts before its dispatch mark is in the ledger: the first one is refused."""
    _setup(db)
    dsn = make_role(*_documented_grants("consumers", TOPIC, 8),
                    "REVOKE EXECUTE ON FUNCTION pgcg.settle FROM {role}")  # fmt: skip
    proc = _start(["consumer", "--group", GROUP, "--topic", TOPIC, "--handler",
                   "pgcg.bench.chaos.journal:record"], dsn)  # fmt: skip
    try:
        member = wait_for(
            lambda: db.execute("SELECT member_id FROM pgcg.consumer_groups").fetchone(),
            30, "the consumer joined",
        )  # fmt: skip
    except AssertionError:
        proc.kill()
        raise
    assign(db, GROUP, TOPIC, [0, 1], member["member_id"])  # its first mark is refused
    code, stderr = _finish(proc)
    line = _error_line(stderr)
    assert code == 2, stderr[-3000:]
    assert "lacks EXECUTE on function settle" in line, line
    assert db.execute("SELECT count(*) AS n FROM pgcg.ledger").fetchone()["n"] == 0


def test_a_consumer_without_usage_on_the_schema(
    db: psycopg.Connection[Any], make_role: Callable[..., str]
) -> None:
    _setup(db)
    dsn = make_role()
    code, stderr = _finish(_start(["consumer", "--group", GROUP, "--topic", TOPIC, "--handler",
                                   "pgcg.bench.chaos.journal:record"], dsn))  # fmt: skip
    line = _error_line(stderr)
    assert code == 2, stderr[-3000:]
    assert "lacks USAGE on schema pgcg" in line


def test_status_and_dlq_without_their_grants(
    db: psycopg.Connection[Any], make_role: Callable[..., str], cli: Callable[..., Result]
) -> None:
    _setup(db)
    dsn = make_role(*FULL_GRANTS, "REVOKE SELECT ON pgcg.dead_letters FROM {role}")
    for args in (["dlq", "list"], ["dlq", "purge", "--all"]):
        result = cli(dsn, *args)
        assert result.exit_code == 2, result.output
        assert "on table dead_letters" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_no_connect_on_the_database(
    db: psycopg.Connection[Any], dsn: str, make_role: Callable[..., str]
) -> None:
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    role_dsn = make_role(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
    with pytest.raises(PermissionDenied) as caught:
        connect_sync(role_dsn)
    assert f"lacks CONNECT on database {database}" in str(caught.value)


def test_the_security_guide_lists_every_table_the_errors_name() -> None:
    """The grants an error names and the guide's table are one list."""
    guide = (ROOT / "docs" / "security.md").read_text()
    rows = {line.split("`")[1] for line in guide.splitlines() if line.startswith("| `")}
    assert set(NEEDS) <= rows


def _documented_grants(process: str, topic: str, segments: int) -> list[str]:
    """The grants docs/security.md (and shared/grants.py) list for `process`, as run on a
    database with one topic: functions and a binding for consumers, table privileges for
    coordinators."""
    out = ["GRANT USAGE ON SCHEMA pgcg TO {role}"]
    if process == "consumers":
        functions = ", ".join(f"pgcg.{f}" for f in CONSUMER_FUNCTIONS)
        return [
            *out,
            f"GRANT EXECUTE ON FUNCTION {functions} TO {{role}}",
            "INSERT INTO pgcg.role_scopes (kind, name, role_id, topic) "
            f"VALUES ('group', '{GROUP}', '{{role}}'::regrole, '{topic}')",
        ]
    names = {
        "log_<topic>_<n>": [f"log_{topic}_{n}" for n in range(segments)],
        "ledger_<topic>_<n>": [f"ledger_{topic}_{n}" for n in range(segments)],
    }
    for table, needs in NEEDS.items():
        for who, privileges in needs:
            if who == process:
                out += [
                    f"GRANT {privileges} ON pgcg.{name} TO {{role}}"
                    for name in names.get(table, [table])
                ]
    offsets = ", ".join(f"pgcg.log_{topic}_p{p}" for p in range(2))
    out.append(f"GRANT USAGE ON SEQUENCE {offsets} TO {{role}}")
    out.append(f"GRANT USAGE, UPDATE ON SEQUENCE pgcg.log_{topic}_segment TO {{role}}")
    functions = ", ".join(f"pgcg.{f}" for f in COORDINATOR_FUNCTIONS)
    out.append(f"GRANT EXECUTE ON FUNCTION {functions} TO {{role}}")
    out.append(
        "INSERT INTO pgcg.role_scopes (kind, name, role_id) "
        "VALUES ('group', '*', '{role}'::regrole)"
    )
    return out


def test_the_documented_grants_are_enough(
    db: psycopg.Connection[Any], make_role: Callable[..., str], tmp_path: Path
) -> None:
    """A consumer and a coordinator holding only what the guide lists handle a topic, and
    the coordinator's upkeep rotates and reclaims its segments."""
    _setup(db)
    # Retention of a second: segments rotate every second and go once handled.
    db.execute("SELECT pgcg.alter_topic(%s, p_retention_ms => 1000)", (TOPIC,))
    (tmp_path / "least.py").write_text("async def handle(message):\n    return None\n")
    coordinator = _start(
        ["coordinator"],
        make_role(*_documented_grants("coordinators", TOPIC, 8)),
        PGCG_MAINTENANCE_INTERVAL="0.2",
    )
    consumer = _start(["consumer", "--group", GROUP, "--topic", TOPIC, "--handler-path",
                       str(tmp_path), "--handler", "least:handle"],
                      make_role(*_documented_grants("consumers", TOPIC, 8)))  # fmt: skip
    try:

        def done_or_failed() -> bool:
            if consumer.poll() is not None or coordinator.poll() is not None:
                return True
            handled = db.execute("SELECT count(*) AS n FROM pgcg.ledger WHERE kind = 'd'")
            reclaimed = db.execute(
                "SELECT count(*) AS n FROM pgcg.segments WHERE reclaimed_at IS NOT NULL"
            )
            if handled.fetchone()["n"] == 0 or unfinished(db, GROUP) > 0:
                return False
            if reclaimed.fetchone()["n"] > 0:
                return True
            # A live topic: a segment goes once a tick after its seal shows it complete.
            enqueue_many_sync(db, TOPIC, [OutgoingMessage("more", {})])
            return False

        wait_for(done_or_failed, 60, "the topic handled and a segment reclaimed")
        exited = [proc.poll() for proc in (consumer, coordinator)]
    finally:
        for proc in (consumer, coordinator):
            proc.terminate()
        results = [_finish(proc) for proc in (consumer, coordinator)]
    for _code, stderr in results:
        assert "pgcg: error:" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert exited == [None, None], "both still running when the topic was done"
