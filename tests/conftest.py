"""Test fixtures: a real PostgreSQL for the session, a fresh migrated database per test.

With PGCG_TEST_DATABASE_URL set, that server is used (the URL's user must be allowed to
create databases); otherwise a throwaway server is started for the session: the embedded
PostgreSQL 18, or with PGCG_TEST_SERVER=15 Debian's PostgreSQL 15 package (or
PGCG_TEST_SERVER=/path/to/bin, any server's bin/ folder). CI runs the tests marked pg15
on PostgreSQL 15 as well: `PGCG_TEST_SERVER=15 pytest -m pg15`.
"""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import Callable, Iterator

import click.testing
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgcg.bench.throwaway import ThrowawayPostgres, faketime_library
from pgcg.shared import testdb
from tests.chart import helm  # noqa: F401 - the helm binary, for the chart tests

TEMPLATE = "pgcg_test_template"
STEPPED_TEMPLATE = "pgcg_stepped_template"

# The quick subset .ci/lowest runs against the lowest allowed dependency versions: what
# leans hardest on psycopg, anyio, pydantic, click and SQLAlchemy, and on the OTel SDK.
LOWEST = {
    "test_consumer.py",
    "test_docs.py",
    "test_guest.py",
    "test_metrics.py",
    "test_outcomes.py",
    "test_payloads.py",
    "test_producer.py",
    "test_sync_producer.py",
    "test_testing_kit.py",
    "test_trace_context.py",
    "test_tracing.py",
}


# Without the otel extra (the first step of .ci/lowest) the modules that need the SDK are
# not collected at all.
if importlib.util.find_spec("opentelemetry.sdk") is None:
    collect_ignore = [
        "test_logging.py",
        "test_metrics.py",
        "test_otel_cluster.py",
        "test_trace_context.py",
        "test_tracing.py",
    ]


# Modules CI also runs on PostgreSQL 15 (`PGCG_TEST_SERVER=15 pytest -m pg15`): the fast
# ones that drive the SQL of the consumer, coordinator, schema and dead letters, about two
# minutes with the plan checks and bench smoke runs (marked pg15 in their own modules).
# The whole suite passes on 15 too; CI's time budget keeps the rest on 18 alone.
PG15_MODULES = {
    "test_acker", "test_adopt", "test_consumer", "test_coordinator", "test_dlq",
    "test_elector", "test_exactly_once", "test_fetcher", "test_fetcher_races",
    "test_release", "test_schema", "test_sweep",
}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in LOWEST:
            item.add_marker(pytest.mark.lowest)
        if item.path.stem in PG15_MODULES:
            item.add_marker(pytest.mark.pg15)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Admin URL of the server the tests use."""
    try:
        with testdb.server() as url:
            yield url
    except FileNotFoundError as exc:
        pytest.exit(f"PGCG_TEST_SERVER: {exc}", returncode=4)


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> str:
    return testdb.migrated_template(pg_server, TEMPLATE)


def _fresh_db(pg_server: str, template: str) -> Iterator[str]:
    with testdb.fresh_database(pg_server, template) as url:
        yield url


@pytest.fixture
def dsn(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh database with the pgcg schema."""
    yield from _fresh_db(pg_server, template_db)


@pytest.fixture
def empty_dsn(pg_server: str) -> Iterator[str]:
    """A fresh database without any pgcg objects."""
    yield from _fresh_db(pg_server, "template0")


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection[dict[str, object]]]:
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture(scope="session")
def stepped_server() -> Iterator[ThrowawayPostgres]:
    """A server of the tests' own whose wall clock a test steps (libfaketime)."""
    if faketime_library() is None:
        pytest.skip("a server with a steppable clock needs libfaketime")
    with ThrowawayPostgres(fake_clock=True) as server:
        testdb.migrated_template(server.url, STEPPED_TEMPLATE)
        yield server


@pytest.fixture
def stepped_dsn(stepped_server: ThrowawayPostgres) -> Iterator[str]:
    """A fresh database with the pgcg schema on the stepped server; its clock is put
    right afterwards."""
    with testdb.fresh_database(stepped_server.url, STEPPED_TEMPLATE) as url:
        try:
            yield url
        finally:
            stepped_server.step_clock(0)


@pytest.fixture
def make_role(dsn: str) -> Iterator[Callable[..., str]]:
    """make_role(*statements) -> the DSN of a new non-superuser LOGIN role in the test
    database, after running each statement with {role} replaced by its name (grants,
    revokes). Tables a grant covers must exist first (create topics before). The roles
    are dropped with everything granted to them when the test ends."""
    made: list[str] = []

    def make(*statements: str) -> str:
        name = f"pgcg_role_{uuid.uuid4().hex[:8]}"
        made.append(name)
        with _admin(dsn) as conn:
            conn.execute(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER')
            for statement in statements:
                conn.execute(statement.format(role=f'"{name}"'))
        return make_conninfo(dsn, user=name)

    try:
        yield make
    finally:
        with _admin(dsn) as conn:
            for name in made:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (name,),
                )
                conn.execute(f'DROP OWNED BY "{name}"')
                conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
def cli() -> Iterator[Callable[..., click.testing.Result]]:
    """Run `pgcg ...` in this process: cli(dsn, "produce", ..., stdin=..., PGCG_X="1").

    Much faster than a subprocess; a crash shows as result.exception that is not a
    SystemExit. The CLI sets up logging for a process, so it is put back afterwards.
    """
    from pgcg.shared.cli import main

    root, ours = logging.getLogger(), logging.getLogger("pgcg")
    saved = (root.handlers[:], root.level, ours.level)
    try:  # click < 8.2 mixes stderr into the output unless told not to
        runner = click.testing.CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        runner = click.testing.CliRunner()

    def run(dsn: str, *args: str, stdin: str | None = None, **env: str) -> click.testing.Result:
        return runner.invoke(
            main,
            list(args),
            input=stdin,
            env={"PGCG_DATABASE_URL": dsn, "PGCG_LOG_FORMAT": "json", **env},
        )

    try:
        yield run
    finally:
        root.handlers[:], level, our_level = saved
        root.setLevel(level)
        ours.setLevel(our_level)
