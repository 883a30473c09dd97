"""Traces: one trace from a request through the queue to the handler, the group protocol's
spans (rebalance, election, partition assign/revoke/release), and the OTEL_* setup.
Spans are read from an in-memory exporter; the database is real."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.coordinator.service import Coordinator
from pgcg.shared.db import connect
from pgcg.shared.errors import ConfigError
from pgcg.shared.producer import OutgoingMessage, Producer
from pgcg.shared.settings import Settings
from pgcg.shared.telemetry import JsonFormatter
from pgcg.shared.tracing import build_tracer_provider
from tests.helpers import assign, await_for, fast_settings, owners
from tests.otel import Otel, install

pytestmark = pytest.mark.anyio

TOPIC = "orders"


@pytest.fixture
def otel() -> Otel:
    return install()


DEFAULTS: dict[str, Any] = {
    "leader_timeout": 3,
    "drain_deadline": 2,
    "retry_base": 0.05,
    "retry_max": 0.1,
    "max_attempts": 3,
}


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


class Captured(logging.Handler):
    """Log records of one logger, as the JSON lines an operator would read."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []
        self.formatter_ = JsonFormatter()
        self.logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.formatter_.format(record)))

    def __enter__(self) -> Captured:
        self.logger.addHandler(self)
        self.previous = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.previous)

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [r for r in self.lines if r.get("action") == action]


class SyncHandler:
    """A synchronous handler (runs in a worker thread): notes the span it runs in, logs,
    and fails the first attempt of the messages named in `fail`."""

    def __init__(self, fail: set[int]) -> None:
        self.fail = fail
        self.seen: dict[tuple[int, int], trace.SpanContext] = {}
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        with self.lock:
            self.seen[(message.id, message.attempt)] = trace.get_current_span().get_span_context()
        logging.getLogger("tests.handler").info(
            "handling %s", message.id, extra={"action": "handling", "message_id": message.id}
        )
        if message.id in self.fail and message.attempt == 1:
            raise RuntimeError(f"boom {message.id}")


async def test_one_trace_from_request_to_handler(
    db: psycopg.Connection[Any], dsn: str, otel: Otel
) -> None:
    group = "traced"
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    foreign = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER) as request:
        conn = await connect(dsn)
        async with conn:
            sent = await Producer().enqueue_many(
                TOPIC,
                [
                    OutgoingMessage("k1", {"n": 1}),
                    OutgoingMessage("k2", {"n": 2}, headers={"tenant": "t1"}),
                    OutgoingMessage("k3", {"n": 3}, headers={"traceparent": foreign}),
                    OutgoingMessage("k4", {"n": 4}),
                ],
                conn=conn,
            )
    ids = [m.id for m in sent]
    assert all(i is not None for i in ids)
    request_id = request.get_span_context().span_id
    (send,) = [
        s
        for s in otel.finished(f"send {TOPIC}")
        if s.parent is not None and s.parent.span_id == request_id
    ]
    assert send.kind is SpanKind.PRODUCER
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.destination.name"] == TOPIC
    assert send.attributes["messaging.batch.message_count"] == 4

    stored = {
        r["id"]: r["headers"]
        for r in db.execute(
            'SELECT "offset" * 1024 + partition AS id, headers FROM pgcg.log'
        ).fetchall()  # type: ignore[call-overload]
    }
    send_parent = f"00-{send.context.trace_id:032x}-{send.context.span_id:016x}-"
    assert stored[ids[0]]["traceparent"].startswith(send_parent)
    assert stored[ids[1]]["traceparent"].startswith(send_parent)
    assert stored[ids[1]]["tenant"] == "t1", "user headers kept"
    assert stored[ids[2]] == {"traceparent": foreign}, "a message's own context is not replaced"

    handler = SyncHandler(fail={ids[3]})
    consumer = Consumer(settings(), group=group, topic=TOPIC, handler=handler, dsn=dsn)
    with Captured("tests.handler") as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            assign(db, group, TOPIC, [0, 1, 2, 3], consumer.member_id)
            await await_for(lambda: len(handler.seen) == 5, 20, "4 messages, one retried")
            mine = {"messaging.consumer.group.name": group}
            await await_for(
                lambda: len(otel.finished(f"process {TOPIC}", **mine)) == 5, 5, "5 process spans"
            )
            consumer.stop()

    def process(message_id: int) -> list[Any]:
        spans = otel.finished(
            f"process {TOPIC}",
            **{"messaging.message.id": str(message_id), "messaging.consumer.group.name": group},
        )
        return sorted(spans, key=lambda s: s.attributes["pgcg.attempt"])

    for message_id in (ids[0], ids[1], ids[3]):
        for span in process(message_id):
            assert span.kind is SpanKind.CONSUMER
            assert span.context.trace_id == request.get_span_context().trace_id, "one trace"
            assert span.parent is not None and span.parent.span_id == send.context.span_id
            assert [link.context.span_id for link in span.links] == [send.context.span_id]
            attrs = span.attributes
            assert attrs["messaging.system"] == "pgcg"
            assert attrs["messaging.operation.name"] == "process"
            assert attrs["messaging.operation.type"] == "process"
            assert attrs["messaging.destination.name"] == TOPIC
            assert attrs["messaging.consumer.group.name"] == group
            assert attrs["messaging.client.id"] == consumer.member_id
            assert attrs["messaging.destination.partition.id"] in {"0", "1", "2", "3"}
            # The handler ran inside its process span.
            seen = handler.seen[(message_id, attrs["pgcg.attempt"])]
            assert (seen.trace_id, seen.span_id) == (span.context.trace_id, span.context.span_id)

    (foreign_span,) = process(ids[2])
    assert foreign_span.context.trace_id == int("ab" * 16, 16)
    assert foreign_span.parent is not None and foreign_span.parent.span_id == int("cd" * 8, 16)

    failed, retried = process(ids[3])
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "RuntimeError"
    assert failed.attributes["pgcg.outcome"] == "retry"
    assert [e.name for e in failed.events] == ["exception"]
    assert retried.status.status_code is not StatusCode.ERROR
    assert retried.attributes["pgcg.attempt"] == 2

    # The handler's own log records carry its process span's ids.
    for record in logs.actions("handling"):
        span = process(record["message_id"])[0]
        if record["message_id"] == ids[3]:
            continue  # two attempts: checked through handler.seen above
        assert record["trace_id"] == f"{span.context.trace_id:032x}"
        assert record["span_id"] == f"{span.context.span_id:016x}"


async def test_group_protocol_spans(db: psycopg.Connection[Any], dsn: str, otel: Otel) -> None:
    group = "rebalanced"
    db.execute("SELECT pgcg.create_topic(%s, 8)", (TOPIC,))

    async def noop(message: Message) -> None:
        return None

    # Generous timeouts: a loaded machine must not turn a revocation into a forced one.
    cfg = settings(session_timeout=6, leader_timeout=6, drain_deadline=10)
    coordinator = Coordinator(cfg, dsn=dsn)
    first = Consumer(cfg, group=group, topic=TOPIC, handler=noop, dsn=dsn)
    second = Consumer(cfg, group=group, topic=TOPIC, handler=noop, dsn=dsn)

    def load() -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for member, _, state in owners(db, group).values():
            if state == "assigned":
                counts[member] = counts.get(member, 0) + 1
        return counts

    with Captured("pgcg") as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(coordinator.run_until_stopped)
            tg.start_soon(lambda: first.run(install_signal_handlers=False))
            await await_for(lambda: load() == {first.member_id: 8}, 20, "first owns all 8")
            tg.start_soon(lambda: second.run(install_signal_handlers=False))
            await second.joined.wait()
            await await_for(lambda: load() == {first.member_id: 4, second.member_id: 4}, 20, "4/4")
            first.stop()
            await await_for(lambda: load() == {second.member_id: 8}, 20, "second owns all 8")
            second.stop()
            await coordinator.stop()

    mine = {"messaging.consumer.group.name": group}
    (election,) = otel.finished("pgcg leader election", **mine)
    assert election.attributes["pgcg.leader_id"] == coordinator.leader_id
    assert election.attributes["pgcg.leader_epoch"] == 1

    spans = otel.finished("pgcg rebalance", **mine)
    rebalances = {
        s.attributes["pgcg.generation"]: s for s in spans if "pgcg.generation" in s.attributes
    }
    # One cut short by the coordinator's stop ends as an error, without an outcome.
    unfinished = [s for s in spans if "pgcg.generation" not in s.attributes]
    assert all(s.status.status_code is StatusCode.ERROR for s in unfinished)
    outcomes = {o.generation: o for o in coordinator.outcomes if o.group == group}
    # A rebalance that commits as the coordinator stops has its span, but the stopping
    # coordinator never records its outcome: at most one such, and the newest.
    late = set(rebalances) - set(outcomes)
    assert len(late) <= 1 and all(g > max(outcomes) for g in late), (rebalances, outcomes)
    rebalances = {g: s for g, s in rebalances.items() if g not in late}
    assert set(rebalances) == set(outcomes), "one span per rebalance that changed something"
    for generation, span in rebalances.items():
        outcome = outcomes[generation]
        assert outcome.trace_id == f"{span.context.trace_id:032x}"
        attrs = span.attributes
        assert attrs["messaging.destination.name"] == TOPIC
        assert attrs["pgcg.leader_epoch"] == 1
        assert attrs["pgcg.reason"] == outcome.reason
        assert list(attrs["pgcg.members"]) == outcome.members
        assert list(attrs["pgcg.moves"]) == [m.describe() for m in outcome.moves]
        assert len([e for e in span.events if e.name == "move"]) == len(outcome.moves)
        # The rebalance's log record is written inside its span.
        (record,) = [r for r in logs.actions("rebalance") if r.get("generation") == generation]
        assert record["group"] == group
        assert record["leader_epoch"] == 1
        assert record["trace_id"] == outcome.trace_id

    # The join of the second member: four partitions revoked from the first, moved to it.
    join = next(
        s for s in rebalances.values() if any("(revoke)" in m for m in s.attributes["pgcg.moves"])
    )
    revoked = [m for m in join.attributes["pgcg.moves"] if "(revoke)" in m]
    assert len(revoked) == 4
    assert all(f":{first.member_id}->{second.member_id}(revoke)" in m for m in revoked)
    assert join.attributes["pgcg.reason"].startswith("member join")

    # The first member's side: each revocation lasted until its release to the second.
    revokes = otel.finished("pgcg partition revoke", **mine)
    assert len(revokes) == 4
    for span in revokes:
        assert span.attributes["messaging.client.id"] == first.member_id
        assert span.attributes["pgcg.outcome"] == "released"
        assert span.attributes["pgcg.to_member"] == second.member_id
        assert span.attributes["pgcg.new_epoch"] == span.attributes["pgcg.epoch"] + 1
        assert span.end_time >= span.start_time
        (record,) = [
            r
            for r in logs.actions("partition_released")
            if r["partition"] == int(span.attributes["messaging.destination.partition.id"])
            and r["member_id"] == first.member_id
            and r["reason"] == "revoked"
        ]
        assert record["trace_id"] == f"{span.context.trace_id:032x}"

    # Shutdown releases (no revocation before them) are spans of their own.
    releases = otel.finished("pgcg partition release", **mine)
    assert {s.attributes["messaging.client.id"] for s in releases} == {
        first.member_id,
        second.member_id,
    }
    assert {s.attributes["pgcg.reason"] for s in releases} == {"shutdown"}
    assigns = otel.finished("pgcg partition assign", **mine)
    assert len([s for s in assigns if s.attributes["messaging.client.id"] == second.member_id]) == 8
    assert any(r["trace_id"] for r in logs.actions("partition_assigned"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def test_tracing_is_off_unless_an_exporter_is_named(clean_env: pytest.MonkeyPatch) -> None:
    assert build_tracer_provider("pgcg-x") is None
    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert build_tracer_provider("pgcg-x") is None
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    assert build_tracer_provider("pgcg-x") is None


def test_otlp_provider_from_the_standard_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    clean_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    clean_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = build_tracer_provider("pgcg-consumer")
    assert provider is not None
    try:
        assert "0.25" in provider.sampler.get_description()
        attrs = provider.resource.attributes
        assert attrs["service.name"] == "pgcg-consumer"
        assert "process.pid" in attrs
    finally:
        provider.shutdown()

    clean_env.setenv("OTEL_SERVICE_NAME", "billing-consumers")
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = build_tracer_provider("pgcg-consumer")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "billing-consumers"
    finally:
        provider.shutdown()


def test_unsupported_exporters_say_what_to_do(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="otlp, console or none"):
        build_tracer_provider("pgcg-x")
    clean_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="http/protobuf or grpc"):
        build_tracer_provider("pgcg-x")
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pgcg\[grpc\]"):
            build_tracer_provider("pgcg-x")
    else:
        provider = build_tracer_provider("pgcg-x")
        assert provider is not None
        provider.shutdown()


def test_psycopg_queries_become_child_spans(dsn: str, otel: Otel) -> None:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    from pgcg.shared.telemetry import setup_telemetry

    setup_telemetry(settings(instrument_psycopg=True), "pgcg-tests")
    try:
        with (
            trace.get_tracer("tests").start_as_current_span("handler work") as parent,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            conn.execute("SELECT 42 AS answer_to_psycopg_spans")
    finally:
        PsycopgInstrumentor().uninstrument()
    (query,) = [
        s
        for s in otel.finished()
        if "answer_to_psycopg_spans" in str((s.attributes or {}).get("db.statement", ""))
        or "answer_to_psycopg_spans" in str((s.attributes or {}).get("db.query.text", ""))
    ]
    assert query.parent is not None
    assert query.parent.span_id == parent.get_span_context().span_id
