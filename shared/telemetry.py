"""Logging: one record per event with stable keys, JSON lines or human text; and the one
call that sets up logs, traces and metrics for a pgcg process.

Every record carries `action` and whatever of group, member_id, partition, epoch and
leader_epoch applies (passed as `extra`), and trace_id/span_id when it was written inside
a span (a rebalance, a partition hand-off, a message's processing), so a log line leads
to its trace. Payloads are never logged; the password of every DSN this process connected
with, and anything shaped like a DSN password, is masked in messages, fields and
tracebacks (shared/redaction.py).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from pgcg.shared.redaction import scrub
from pgcg.shared.terminal import printable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pgcg.shared.settings import Settings

# Attributes every LogRecord has; anything else came in through `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {
        k: scrub(v) if isinstance(v, str) else v
        for k, v in record.__dict__.items()
        if k not in _STANDARD
    }
    if "trace_id" not in fields:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            fields["trace_id"] = format(span_context.trace_id, "032x")
            fields["span_id"] = format(span_context.span_id, "016x")
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """For a terminal: database text in a record (keys, member ids, errors) is escaped."""

    KEYS = ("action", "group", "member_id", "partition", "epoch", "leader_epoch", "trace_id")

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        keys = " ".join(
            f"{k}={printable(fields[k])}" for k in self.KEYS if fields.get(k) is not None
        )
        message = printable(scrub(record.getMessage()))
        line = f"{ts} {record.levelname:<7} {record.name}: {message}"
        if keys:
            line += f"  [{keys}]"
        if record.exc_info:
            trace_text = scrub(self.formatException(record.exc_info))
            line += "\n" + printable(trace_text, keep_newlines=True)
        return line


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Logging for a process that pgcg's own command runs: one handler on the root logger,
    so the records of the user's handler modules come out in the same format.

    Only the CLI calls this; pgcg as a library never touches the root logger, its level
    or its handlers, and with fmt "none" neither does the CLI. The root level is at most
    INFO (a handler's logger.info shows) and `level` applies to pgcg's own loggers, so
    DEBUG is pgcg's debug rather than every library's.
    """
    if fmt == "none":
        return
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.getLogger("pgcg").setLevel(level)


@dataclass(frozen=True)
class Telemetry:
    tracing: bool  # an SDK tracer provider is installed
    registry: CollectorRegistry | None  # what /metrics renders, if anything


def setup_telemetry(settings: Settings, service_name: str) -> Telemetry:
    """Traces and metrics for a long-running pgcg process (logging is set up by the CLI).

    Tracing follows OTEL_* (off unless OTEL_TRACES_EXPORTER names an exporter); metrics
    get a Prometheus reader when the HTTP endpoint is on, plus OTEL_METRICS_EXPORTER's.
    Call before the first connection, so PGCG_INSTRUMENT_PSYCOPG sees every query.
    """
    from pgcg.shared.metrics import setup_metrics
    from pgcg.shared.tracing import instrument_psycopg, setup_tracing

    tracing = setup_tracing(service_name)
    registry = setup_metrics(service_name, prometheus=settings.http_port > 0)
    if settings.instrument_psycopg:
        instrument_psycopg()
    logging.getLogger("pgcg.telemetry").debug(
        "telemetry: tracing %s, /metrics %s, psycopg spans %s",
        "on" if tracing else "off",
        "on" if registry is not None else "off",
        "on" if settings.instrument_psycopg else "off",
        extra={"action": "telemetry_configured"},
    )
    return Telemetry(tracing, registry)
