"""A role missing a privilege gets one line naming the privilege and the object, exit 2,
never a traceback: coordinator and consumer processes run as real non-superuser roles. No
process holds a privilege on any table: a consumer holds EXECUTE on its functions and a
binding to its group, a coordinator and an administrator EXECUTE on theirs and a binding
to every group (tests/test_roles.py proves the isolation)."""

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
from pgcg.shared.grants import FUNCTIONS
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
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


def test_a_coordinator_without_execute_on_maintain(
    db: psycopg.Connection[Any], make_role: Callable[..., str]
) -> None:
    """Topic upkeep runs as the schema's owner through pgcg.maintain."""
    _setup(db)
    dsn = make_role(*_documented_grants("coordinator", TOPIC),
                    "REVOKE EXECUTE ON FUNCTION pgcg.maintain FROM {role}")  # fmt: skip
    code, stderr = _finish(_start(["coordinator"], dsn))
    line = _error_line(stderr)
    assert code == 2, stderr[-3000:]
    assert "lacks EXECUTE on function maintain" in line, line
    assert "`pgcg roles coordinator <role>`" in line and "docs/security.md" in line, line


def test_a_consumer_without_execute_on_settle(
    db: psycopg.Connection[Any], make_role: Callable[..., str]
) -> None:
    """Nothing starts before its dispatch mark is in the ledger: the first one is refused."""
    _setup(db)
    dsn = make_role(*_documented_grants("consumer", TOPIC),
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
    dsn = make_role(*_documented_grants("admin", TOPIC),
                    "REVOKE EXECUTE ON FUNCTION pgcg.list_dead_letters, pgcg.purge_dead_letters "
                    "FROM {role}")  # fmt: skip
    for args, function in ((["dlq", "list"], "list_dead_letters"),
                           (["dlq", "purge", "--all"], "purge_dead_letters")):  # fmt: skip
        result = cli(dsn, *args)
        assert result.exit_code == 2, result.output
        assert f"lacks EXECUTE on function {function}" in result.output, result.output
        assert "`pgcg roles admin <role>`" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_no_connect_on_the_database(
    db: psycopg.Connection[Any], dsn: str, make_role: Callable[..., str]
) -> None:
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    role_dsn = make_role(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
    with pytest.raises(PermissionDenied) as caught:
        connect_sync(role_dsn)
    assert f"lacks CONNECT on database {database}" in str(caught.value)


def test_the_security_guide_lists_every_function_of_each_kind() -> None:
    """The functions `pgcg roles` grants and the guide's table are one list."""
    guide = (ROOT / "docs" / "security.md").read_text()
    kinds: dict[str, set[str]] = {}
    for line in guide.splitlines():
        if line.startswith("| `"):
            cells = line.split("|")
            for function in cells[1].split("`")[1::2]:
                kinds.setdefault(function, set()).update(k.strip() for k in cells[2].split(","))
    for kind, functions in FUNCTIONS.items():
        for function in functions:
            assert kind in kinds.get(function, set()), (function, kind)
    listed = {f for f, k in kinds.items() if k & set(FUNCTIONS)}
    assert listed == {f for functions in FUNCTIONS.values() for f in functions}


def _documented_grants(kind: str, topic: str) -> list[str]:
    """The grants docs/security.md (and shared/grants.py) list for `kind`: USAGE on the
    schema, EXECUTE on its functions and its binding (a consumer's to its group, a
    coordinator's and an administrator's to every group). No table."""
    functions = ", ".join(f"pgcg.{f}" for f in FUNCTIONS[kind])
    bound = (
        f"VALUES ('group', '{GROUP}', '{{role}}'::regrole, '{topic}')"
        if kind == "consumer"
        else "VALUES ('group', '*', '{role}'::regrole, '*')"
    )
    return [
        "GRANT USAGE ON SCHEMA pgcg TO {role}",
        f"GRANT EXECUTE ON FUNCTION {functions} TO {{role}}",
        f"INSERT INTO pgcg.role_scopes (kind, name, role_id, topic) {bound}",
    ]


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
        make_role(*_documented_grants("coordinator", TOPIC)),
        PGCG_MAINTENANCE_INTERVAL="0.2",
    )
    consumer = _start(["consumer", "--group", GROUP, "--topic", TOPIC, "--handler-path",
                       str(tmp_path), "--handler", "least:handle"],
                      make_role(*_documented_grants("consumer", TOPIC)))  # fmt: skip
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
