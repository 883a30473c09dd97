"""Log records as operators grep them: one JSON line per event with stable keys, trace ids
inside spans, expected events at info and noisy ones at debug, and never a DSN password
or a payload, from a real consumer run against a real database."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import psycopg
import pytest
from opentelemetry import trace
from psycopg.conninfo import make_conninfo

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.shared.db import connect
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from pgcg.shared.telemetry import JsonFormatter, TextFormatter
from tests.helpers import assign, await_for, pending
from tests.otel import Otel, install

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-pw-7"
SECRET_PAYLOAD = "card-4111-1111-1111-1111"
TOPIC = "orders"


@pytest.fixture
def otel() -> Otel:
    return install()


class Lines(logging.Handler):
    """Every record of the `pgcg` loggers, formatted as the JSON lines a process writes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.text: list[str] = []
        self.logger = logging.getLogger("pgcg")

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text]

    def __enter__(self) -> Lines:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


def record(msg: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("pgcg.test", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    if exc:
        try:
            raise RuntimeError(f"connect to postgresql://app:{PASSWORD}@db:5432/app failed")
        except RuntimeError:
            import sys

            rec.exc_info = sys.exc_info()
    return rec


def test_json_lines_carry_keys_and_trace_ids(otel: Otel) -> None:
    fmt = JsonFormatter()
    outside = json.loads(fmt.format(record("x", action="a", group="g", partition=3, epoch=7)))
    assert {k: outside[k] for k in ("action", "group", "partition", "epoch", "level")} == {
        "action": "a",
        "group": "g",
        "partition": 3,
        "epoch": 7,
        "level": "info",
    }
    assert "trace_id" not in outside and "span_id" not in outside
    with trace.get_tracer("tests").start_as_current_span("work") as span:
        inside = json.loads(fmt.format(record("x", action="a")))
        text = TextFormatter().format(record("y", action="b", member_id="m1"))
    ctx = span.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}"
    assert inside["span_id"] == f"{ctx.span_id:016x}"
    assert "action=b member_id=m1" in text and f"trace_id={ctx.trace_id:032x}" in text


def test_passwords_are_masked_even_in_raw_messages_and_tracebacks() -> None:
    for fmt in (JsonFormatter(), TextFormatter()):
        line = fmt.format(record("using %s", f"postgresql://app:{PASSWORD}@db/app", exc=True))
        assert PASSWORD not in line
        assert "postgresql://app:***@db/app" in line


async def test_an_unreachable_database_is_logged_without_its_password() -> None:
    with Lines() as lines:
        try:
            await connect(f"postgresql://app:{PASSWORD}@127.0.0.1:1/app")
        except DatabaseUnavailable as exc:
            logging.getLogger("pgcg.test").warning(
                "cannot connect: %s", exc, exc_info=True, extra={"action": "db_retry"}
            )
    (line,) = lines.text
    assert "cannot reach PostgreSQL at postgresql://app:***@127.0.0.1:1/app" in line
    assert PASSWORD not in line


async def test_a_consumer_run_logs_events_by_key_and_no_secrets(
    db: psycopg.Connection[Any], dsn: str, otel: Otel
) -> None:
    group = "logged"
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    sent = enqueue_many_sync(
        db, TOPIC, [OutgoingMessage(f"k{i}", {"secret": SECRET_PAYLOAD, "n": i}) for i in range(4)]
    )
    doomed = sent[0].id

    async def handle(message: Message) -> None:
        if message.id == doomed:
            raise ValueError("declined")

    secret_dsn = make_conninfo(dsn, password=PASSWORD)  # the test server trusts any password
    cfg = Settings(heartbeat_interval=0.5, session_timeout=3, retry_base=0.02, retry_max=0.05,
                   max_attempts=2)  # fmt: skip
    consumer = Consumer(cfg, group=group, topic=TOPIC, handler=handle, dsn=secret_dsn)
    with Lines() as lines:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            assign(db, group, TOPIC, [0, 1], consumer.member_id)
            await await_for(lambda: pending(db, TOPIC) == 0, 20, "queue drained")
            consumer.stop()

    everything = "\n".join(lines.text)
    assert PASSWORD not in everything
    assert SECRET_PAYLOAD not in everything

    def by(action: str) -> list[dict[str, Any]]:
        return [r for r in lines.records if r.get("action") == action]

    member = consumer.member_id
    (joined,) = by("member_joined")
    assert (joined["level"], joined["group"], joined["member_id"]) == ("info", group, member)
    assigned = by("partition_assigned")
    assert sorted(r["partition"] for r in assigned) == [0, 1]
    assert all(r["level"] == "info" and r["epoch"] >= 1 and r["member_id"] == member
               for r in assigned)  # fmt: skip
    (retry,) = by("message_retry")
    assert (retry["level"], retry["message_id"], retry["attempt"]) == ("info", doomed, 1)
    (dead,) = by("message_dead_lettered")
    assert (dead["level"], dead["message_id"], dead["attempt"]) == ("warning", doomed, 2)
    assert {"partition", "epoch", "group", "member_id"} <= set(dead)
    # Per-message records are debug, and written inside the message's process span.
    handled = by("message_handled")
    assert len(handled) == 3 and all(r["level"] == "debug" for r in handled)
    spans = {
        s.attributes["messaging.message.id"]: s
        for s in otel.finished(f"process {TOPIC}", **{"messaging.consumer.group.name": group})
    }
    for r in handled:
        assert r["trace_id"] == f"{spans[str(r['message_id'])].context.trace_id:032x}"
    assert all(r["level"] == "debug" for r in by("claimed"))
    released = by("partition_released")
    assert sorted(r["partition"] for r in released) == [0, 1]
    assert all(r["level"] == "info" and r["reason"] == "shutdown" for r in released)
    assert by("member_left") and by("consumer_stopped")
    # Every record of an event names it, and nothing at info or above is per message.
    assert all(r.get("action") for r in lines.records)
    per_message = {"message_handled", "claimed"}
    assert not [r for r in lines.records if r["action"] in per_message and r["level"] != "debug"]
