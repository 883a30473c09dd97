"""No connection secret is ever printed: every DSN form a user can write, parsed the way
libpq parses it, through redaction, error translation, the CLI, logs and `pgcg demo`."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict

from pgcg.shared.cli import main
from pgcg.shared.db import connect_sync, translate
from pgcg.shared.errors import ConfigError, PgcgError
from pgcg.shared.redaction import MISREAD, UNPARSEABLE, redact, remember, scrub
from pgcg.shared.telemetry import JsonFormatter, TextFormatter


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _closed_port()  # nothing listens: every connection attempt fails
# (DSN, what redact() shows, every piece of the secret that must never appear)
FORMS = [
    (f"postgresql://:S3CRETpw@127.0.0.1:{PORT}/app",
     f"postgresql://:***@127.0.0.1:{PORT}/app", ["S3CRETpw"]),
    (f"password = S3CRETpw host=127.0.0.1 port={PORT}",
     f"password=*** host=127.0.0.1 port={PORT}", ["S3CRETpw"]),
    (f"host=127.0.0.1 password='S3CRET pw2' port={PORT}",
     f"host=127.0.0.1 password=*** port={PORT}", ["S3CRET", "pw2"]),
    # libpq would read "pw3@127.0.0.1" as the host, "w8" as the port: not shown at all.
    (f"postgresql://app:S3CRET@pw3@127.0.0.1:{PORT}/app", MISREAD, ["S3CRET", "pw3"]),
    (f"postgresql://app:S3CRET/w8@127.0.0.1:{PORT}/app", MISREAD, ["S3CRET", "w8"]),
    # An @ in the query (a user name like Azure's) is not user info.
    (f"postgresql://127.0.0.1:{PORT}/app?user=admin@srv&password=S3CRETpw",
     f"postgresql://127.0.0.1:{PORT}/app?user=admin@srv&password=***", ["S3CRETpw"]),
    (f"postgresql://app@127.0.0.1:{PORT}/app?password=S3CRETpw&sslmode=disable",
     f"postgresql://app@127.0.0.1:{PORT}/app?password=***&sslmode=disable", ["S3CRETpw"]),
    (f"postgresql://127.0.0.1:{PORT}/app?password=S3CRETpw",
     f"postgresql://127.0.0.1:{PORT}/app?password=***", ["S3CRETpw"]),
    (f"postgresql://app:S3CRET%40pw4@127.0.0.1:{PORT}/app",
     f"postgresql://app:***@127.0.0.1:{PORT}/app", ["S3CRET", "pw4"]),
    (f"host=127.0.0.1 port={PORT} sslpassword=S3CRETkey",
     f"host=127.0.0.1 port={PORT} sslpassword=***", ["S3CRETkey"]),
]  # fmt: skip
# Connection strings libpq cannot parse: it quotes pieces of them in its errors.
UNPARSEABLE_FORMS = [
    ("password = S3CRET pw5 host=x", ["S3CRET", "pw5"]),
    ("postgresql://app:S3CRET pw6@127.0.0.1/app", ["S3CRET", "pw6"]),
    ("postgresql://app:S3CRET@[::1/app", ["S3CRET"]),
    ("postgresql://app:S3%zzCRET@127.0.0.1/app", ["S3%zzCRET", "zzCRET"]),
    ("host=x password='S3CRET pw7", ["S3CRET", "pw7"]),
]


def _clean(text: str, secrets: list[str]) -> bool:
    return not any(secret in text for secret in secrets)


@pytest.mark.parametrize(("dsn", "shown", "secrets"), FORMS)
def test_every_dsn_form_is_redacted(dsn: str, shown: str, secrets: list[str]) -> None:
    if dsn.startswith("postgresql://"):
        assert redact(dsn) == shown  # in the form the user wrote
    else:
        assert conninfo_to_dict(redact(dsn)) == conninfo_to_dict(shown)
    assert _clean(redact(dsn), secrets)


@pytest.mark.parametrize(("dsn", "secrets"), UNPARSEABLE_FORMS)
def test_a_dsn_that_does_not_parse_is_never_echoed(dsn: str, secrets: list[str]) -> None:
    shown = redact(dsn)
    assert _clean(shown, secrets), shown
    assert shown == UNPARSEABLE
    with pytest.raises(PgcgError) as caught:
        connect_sync(dsn)
    assert isinstance(caught.value, ConfigError)
    assert _clean(str(caught.value), secrets), caught.value


@pytest.mark.parametrize(("dsn", "shown", "secrets"), FORMS)
def test_a_failed_connection_names_the_server_but_not_the_secret(
    dsn: str, shown: str, secrets: list[str]
) -> None:
    with pytest.raises(PgcgError) as caught:
        connect_sync(dsn)
    message = str(caught.value)
    assert _clean(message, secrets), message
    if redact(dsn) == MISREAD:
        assert "percent-encode" in message  # what to fix, rather than a host not found
    else:
        assert redact(dsn) in message


@pytest.mark.parametrize(
    ("dsn", "shown", "secrets"), FORMS + [(d, "", s) for d, s in UNPARSEABLE_FORMS]
)
def test_the_cli_prints_one_line_without_the_secret(
    dsn: str, shown: str, secrets: list[str]
) -> None:
    for args in (["status"], ["topic", "list"], ["dlq", "list"]):
        result = CliRunner().invoke(main, args, env={"PGCG_DATABASE_URL": dsn})
        assert result.exit_code in (2, 4), result.output
        assert _clean(result.output, secrets), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_log_lines_mask_every_form_and_remembered_passwords() -> None:
    remember("host=db user=app password=Rem3mbered")
    for dsn, _, secrets in FORMS:
        for fmt in (JsonFormatter(), TextFormatter()):
            record = logging.LogRecord("pgcg.t", logging.WARNING, __file__, 1, "using %s",
                                       (dsn,), None)  # fmt: skip
            assert _clean(fmt.format(record), secrets), (dsn, fmt.format(record))
    # A password a process connected with is masked wherever it shows up, DSN or not.
    assert scrub("auth with Rem3mbered failed") == "auth with *** failed"


def test_driver_errors_are_cleaned_wherever_they_come_from() -> None:
    """translate() without the DSN (a query error deep in a loop) still masks what it can."""
    remember(FORMS[0][0])
    try:
        psycopg.connect(FORMS[0][0], connect_timeout=2)
    except psycopg.OperationalError as exc:
        better = translate(exc)
    assert better is not None and "S3CRETpw" not in str(better)


def test_demo_never_prints_a_password() -> None:
    """`pgcg demo` on a URL without a user (the case that once leaked in a traceback)."""
    dsn = f"postgresql://:S3CRETpw@127.0.0.1:{PORT}/app"
    result = subprocess.run(
        [sys.executable, "-m", "pgcg.shared.cli", "demo", "--database-url", dsn],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "PGCG_LOG_FORMAT": "json"},
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 4, out
    assert "S3CRETpw" not in out
    assert "Traceback" not in out
    assert f"postgresql://:***@127.0.0.1:{PORT}/app" in out
