"""pgcg as a good guest in someone else's process: the root logger stays the host's,
/healthz notices a blocked event loop, and CLI flags have their real types."""

from __future__ import annotations

import ast
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import click
import click.testing
import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.cli import main, with_settings
from pgcg.shared.health import HealthServer, LoopWatch
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import FAST_SETTINGS, assign, await_for, pending, running

ROOT = Path(__file__).resolve().parent.parent

# -- logging -------------------------------------------------------------------------------

# The one place that may configure the root logger: the CLI's own setup, for its process.
ALLOWED = {"shared/telemetry.py"}


def _root_logger_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "logging":
                if node.func.attr in ("basicConfig", "disable", "captureWarnings"):
                    found.append(f"logging.{node.func.attr}()")
                if node.func.attr == "getLogger" and (
                    not node.args
                    or (isinstance(node.args[0], ast.Constant) and not node.args[0].value)
                ):
                    found.append("logging.getLogger() (the root logger)")
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "root"
            and isinstance(node.value, ast.Name)
            and node.value.id == "logging"
        ):
            found.append("logging.root")
    return found


def test_library_code_only_uses_named_loggers() -> None:
    offenders = []
    for folder in ("shared", "consumer", "coordinator"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in ALLOWED:
                continue
            for use in _root_logger_uses(ast.parse(path.read_text())):
                offenders.append(f"{rel}: {use}")
    assert offenders == []


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def host_logging() -> Any:
    """The host application's logging: its own handler on the root logger, at INFO."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("pgcg").level)
    host = Captured()
    root.handlers[:] = [host]
    root.setLevel(logging.INFO)
    yield host
    root.handlers[:], level, pgcg_level = saved
    root.setLevel(level)
    logging.getLogger("pgcg").setLevel(pgcg_level)


@pytest.mark.anyio
async def test_an_embedded_consumer_leaves_the_hosts_logging_alone(
    db: psycopg.Connection[Any], dsn: str, host_logging: Captured
) -> None:
    db.execute("SELECT pgcg.create_topic('orders', 1)")
    enqueue_many_sync(db, "orders", [OutgoingMessage("k", {"n": 1})])
    app_log = logging.getLogger("myapp.billing")

    async def handle(message: Message[Any]) -> None:
        app_log.info("billed %s", message.payload["n"])

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    consumer = Consumer(Settings(**FAST_SETTINGS), group="g", topic="orders", handler=handle,
                        dsn=dsn)  # fmt: skip
    async with running(consumer):
        assign(db, "g", "orders", [0], consumer.member_id)
        await await_for(lambda: pending(db, "orders") == 0, 20, "the message handled")
    assert (root.handlers, root.level) == before
    assert "billed 1" in [r.getMessage() for r in host_logging.records]


def test_log_format_none_leaves_logging_alone(cli: Any, dsn: str, host_logging: Captured) -> None:
    root = logging.getLogger()
    before = (root.handlers[:], root.level, logging.getLogger("pgcg").level)
    result = cli(dsn, "topic", "list", PGCG_LOG_FORMAT="none", PGCG_LOG_LEVEL="DEBUG")
    assert result.exit_code == 0, result.output
    assert (root.handlers, root.level, logging.getLogger("pgcg").level) == before


def test_the_cli_lets_a_handlers_info_records_through(cli: Any, dsn: str) -> None:
    result = cli(dsn, "topic", "list", PGCG_LOG_LEVEL="WARNING")
    assert result.exit_code == 0, result.output
    assert logging.getLogger().level == logging.WARNING
    result = cli(dsn, "topic", "list", PGCG_LOG_LEVEL="DEBUG")
    assert result.exit_code == 0, result.output
    # Root at INFO: a handler's logger.info shows, other libraries' debug does not.
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("pgcg").getEffectiveLevel() == logging.DEBUG


# -- /healthz and a blocked loop -----------------------------------------------------------


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.anyio
async def test_healthz_fails_while_the_event_loop_is_blocked() -> None:
    watch = LoopWatch(stall_after=2.0, interval=0.05)
    with HealthServer(0, ready=lambda: (True, ""), alive=watch.alive, host="127.0.0.1") as server:
        url = f"http://127.0.0.1:{server.port}/healthz"
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            assert await anyio.to_thread.run_sync(_status, url) == (200, "ok\n")
            seen: list[tuple[int, str]] = []

            def probe_until_unhealthy() -> None:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    seen.append(_status(url))
                    if seen[-1][0] != 200:
                        return
                    time.sleep(0.05)

            prober = threading.Thread(target=probe_until_unhealthy)
            prober.start()
            prober.join()  # blocks the event loop itself until the probe saw it
            status, body = seen[-1]
            assert status == 503
            assert body.startswith("unhealthy: event loop stalled: it last ran ")
            # Running again, healthy again.
            await await_for(lambda: anyio.to_thread.run_sync(_status, url), 20, "healthy again")
            assert (await anyio.to_thread.run_sync(_status, url))[0] == 200
            tg.cancel_scope.cancel()


def test_a_loop_watch_that_never_ran_is_stalled() -> None:
    watch = LoopWatch(stall_after=0.05)
    deadline = time.monotonic() + 5
    while watch.alive()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    ok, detail = watch.alive()
    assert not ok and "stalled" in detail


# -- CLI flags with their real types -------------------------------------------------------


def test_help_shows_each_flags_type() -> None:
    result = click.testing.CliRunner().invoke(main, ["consumer", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert "--session-timeout FLOAT" in text
    assert "--concurrency INTEGER" in text
    assert "--database-url URL" in text
    assert "--instrument-psycopg / --no-instrument-psycopg" in text
    assert "--log-format [auto|json|text|none]" in text


@click.command()
@with_settings("session_timeout", "instrument_psycopg", "log_level", "log_format")
def probe(settings: Settings) -> None:
    click.echo(f"{settings.session_timeout!r} {settings.instrument_psycopg!r} {settings.log_level}")


@pytest.mark.parametrize(
    ("args", "env", "out"),
    [
        ([], {}, "10.0 False INFO"),
        (["--session-timeout", "12.5", "--instrument-psycopg"], {}, "12.5 True INFO"),
        ([], {"PGCG_INSTRUMENT_PSYCOPG": "true", "PGCG_SESSION_TIMEOUT": "11"}, "11.0 True INFO"),
        (["--no-instrument-psycopg"], {"PGCG_INSTRUMENT_PSYCOPG": "true"}, "10.0 False INFO"),
        (["--log-level", "debug"], {}, "10.0 False DEBUG"),
    ],
)
def test_flags_parse_to_their_types(args: list[str], env: dict[str, str], out: str) -> None:
    result = click.testing.CliRunner().invoke(probe, [*args, "--log-format", "none"], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--session-timeout", "soon"], "'soon' is not a valid float"),
        (["--instrument-psycopg=yes"], "does not take a value"),
        (["--log-format", "xml"], "'xml' is not one of"),
    ],
)
def test_usage_errors_name_the_type(args: list[str], says: str) -> None:
    result = click.testing.CliRunner().invoke(probe, args)
    assert result.exit_code == 2
    assert says in " ".join(result.output.split())
