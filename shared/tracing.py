"""Traces: the OTel SDK set up from the standard OTEL_* variables, W3C trace context carried
in message headers, and the spans pgcg emits.

Configuration (all standard OpenTelemetry variables):
  OTEL_TRACES_EXPORTER         none (default) | otlp | console; comma-separated for several
  OTEL_EXPORTER_OTLP_PROTOCOL  http/protobuf (default) | grpc (needs `pip install pgcg[grpc]`)
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, ...   read by the exporter
  OTEL_TRACES_SAMPLER(_ARG)    read by the SDK, e.g. parentbased_traceidratio and 0.01
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_PROPAGATORS, OTEL_SDK_DISABLED

With the exporter `none` no SDK provider is installed at all: the OTel API stays a no-op,
and every helper here returns before building a single attribute, so the hot path costs
a function call and a type check. Span names and attributes follow the OpenTelemetry
messaging semantic conventions: `send <topic>` (PRODUCER) and `process <topic>` (CONSUMER),
the processing span a child of the producer's context (and linked to it, as the
conventions ask of consumers), one trace from the request that enqueued to the handler.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from pgcg.shared.errors import ConfigError
from pgcg.shared.extras import require

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

tracer = trace.get_tracer("pgcg")

# Messaging semantic conventions (attribute names as the spec spells them).
SYSTEM = "pgcg"
MESSAGING_SYSTEM = "messaging.system"
OPERATION_NAME = "messaging.operation.name"
OPERATION_TYPE = "messaging.operation.type"
DESTINATION = "messaging.destination.name"
CONSUMER_GROUP = "messaging.consumer.group.name"
PARTITION = "messaging.destination.partition.id"
MESSAGE_ID = "messaging.message.id"
CLIENT_ID = "messaging.client.id"
BATCH_COUNT = "messaging.batch.message_count"
ERROR_TYPE = "error.type"

# W3C trace context headers; a message that already carries these keeps the caller's own.
TRACE_HEADERS = ("traceparent", "tracestate")

_NOOP = NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)


_enabled = False
_checked_at = -1.0


def enabled() -> bool:
    """Whether an SDK tracer provider is installed (by setup_tracing, or by the app).

    Asked once per message, so it must be cheaper than the API's lookup (an environment
    read and a type check, a few microseconds): a provider can be installed only once
    and never removed, so True is final; False is re-checked at most once a second.
    """
    global _enabled, _checked_at
    if _enabled:
        return True
    now = time.monotonic()
    if now - _checked_at < 1.0:
        return False
    _checked_at = now
    _enabled = not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )
    return _enabled


# -- setup --------------------------------------------------------------------------------


def _exporter(name: str) -> SpanExporter:
    if name in ("console", "otlp"):
        require("otel", "opentelemetry.sdk", f"OTEL_TRACES_EXPORTER={name}")
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none"
        )
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        require("otel", "opentelemetry.exporter.otlp.proto.http", "OTLP over http/protobuf")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter, which is not "
                "installed: `pip install 'pgcg[grpc]'`, or use http/protobuf (port 4318)"
            ) from None
        return GrpcSpanExporter()
    raise ConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc"
    )


def resource(service_name: str) -> Any:
    """Service name (unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES set one), host
    and pid, so the processes of one trace tell apart; OTEL_RESOURCE_ATTRIBUTES merged."""
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = {"host.name": socket.gethostname(), "process.pid": os.getpid()}
    env_attrs = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in env_attrs:
        attributes["service.name"] = service_name
    return Resource.create(attributes)


def build_tracer_provider(service_name: str) -> TracerProvider | None:
    """The provider OTEL_* asks for, or None when tracing is off (exporter none)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [
        n.strip().lower()
        for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")
        if n.strip()
    ]
    exporters = [_exporter(n) for n in names if n != "none"]
    if not exporters:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # No sampler argument: the SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
    provider = TracerProvider(resource=resource(service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(service_name: str) -> bool:
    """Install the configured provider globally, unless tracing is off or the application
    already installed one (then pgcg's spans go to the application's). True if tracing."""
    if enabled():
        return True
    provider = build_tracer_provider(service_name)
    if provider is None:
        return False
    trace.set_tracer_provider(provider)  # flushed and shut down at exit by the SDK
    recheck()
    return True


def recheck() -> None:
    """Make the next enabled() look again (after installing a provider by hand)."""
    global _checked_at
    _checked_at = -1.0


def instrument_psycopg() -> None:
    """Every psycopg query as a child span (PGCG_INSTRUMENT_PSYCOPG=true)."""
    require("otel", "opentelemetry.instrumentation.psycopg", "PGCG_INSTRUMENT_PSYCOPG=true")
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    instrumentor = PsycopgInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


# -- propagation --------------------------------------------------------------------------


def current_headers() -> dict[str, str]:
    """The current trace context as message headers ({} when there is none)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def with_trace_headers(headers: Mapping[str, str], trace_headers: Mapping[str, str]) -> Any:
    """The message's headers plus the trace context, unless it carries its own already."""
    if not trace_headers or any(h in headers for h in TRACE_HEADERS):
        return headers
    return {**trace_headers, **headers}


@contextlib.contextmanager
def send_span(topic: str) -> Iterator[tuple[Span, dict[str, str]]]:
    """A PRODUCER span around one enqueue call, and the headers that carry its context.

    Without an SDK no span is started, but a context the application already has (e.g.
    extracted from an incoming request by its own instrumentation) is still passed on.
    """
    if not enabled():
        yield _NOOP, current_headers()
        return
    with tracer.start_as_current_span(f"send {topic}", kind=SpanKind.PRODUCER) as span:
        if span.is_recording():
            span.set_attributes(
                {
                    MESSAGING_SYSTEM: SYSTEM,
                    OPERATION_NAME: "send",
                    OPERATION_TYPE: "send",
                    DESTINATION: topic,
                }
            )
        yield span, current_headers()


def sent(span: Span, results: list[Any]) -> None:
    """Describe what an enqueue call wrote on its send span."""
    if not span.is_recording():
        return
    span.set_attribute(BATCH_COUNT, len(results))
    if len(results) == 1 and results[0].id is not None:
        span.set_attribute(MESSAGE_ID, str(results[0].id))
        span.set_attribute(PARTITION, str(results[0].partition))


def process_span(message: Any, group: str) -> Span:
    """Start (not enter) the CONSUMER span of one delivery, continuing the producer's trace.

    The producer's context is the parent (one trace from request to handler) and also a
    link, as the conventions ask of consumer spans, which stays correct for trace viewers
    that only follow links across a queue.

    This runs once per message, so the common cases skip what they can. A W3C
    traceparent alone is parsed here rather than through the propagator API (5x cheaper,
    same result: tests compare the two). A producer that was not sampled gets a
    non-recording child without asking the SDK when the sampler is parent-based and
    drops such children anyway, which is what every OTEL_TRACES_SAMPLER=parentbased_*
    sampler does: at a 1 % ratio that is 99 % of messages.
    """
    headers = message.headers
    producer = None
    if headers and "traceparent" in headers:
        parsed = _parse_w3c(headers)
        if parsed is None:
            producer = _extract(headers)
        else:
            trace_id, span_id, flags = parsed
            valid = trace_id and span_id
            if valid and not flags & TraceFlags.SAMPLED and _drops_unsampled_remote_parent():
                return NonRecordingSpan(
                    SpanContext(
                        trace_id,
                        random.getrandbits(64) or 1,  # reseeded after fork, as the SDK's
                        is_remote=False,
                        trace_flags=_FLAGS[flags & _INHERITED_FLAGS],
                    )
                )
            producer = _remote(parsed)
    if producer is None:
        # A traceparent that is not valid starts a new trace, as the propagator would
        # have it; without one the span joins whatever context the application runs in.
        root = Context() if headers and "traceparent" in headers else None
        span = tracer.start_span(f"process {message.topic}", context=root, kind=SpanKind.CONSUMER)
    else:
        span = tracer.start_span(
            f"process {message.topic}",
            context=trace.set_span_in_context(NonRecordingSpan(producer)),
            kind=SpanKind.CONSUMER,
            # An unsampled producer's child is dropped by the parent-based samplers
            # anyway: no Link object for it.
            links=[Link(producer)] if producer.trace_flags.sampled else None,
        )
    if span.is_recording():
        # Set on the span, not passed to start_span: the SDK keeps only what the sampler
        # hands back, and a custom sampler may hand back its own attributes alone.
        span.set_attributes(_process_attributes(message, group))
    return span


def _process_attributes(message: Any, group: str) -> dict[str, Any]:
    return {
        MESSAGING_SYSTEM: SYSTEM,
        OPERATION_NAME: "process",
        OPERATION_TYPE: "process",
        DESTINATION: message.topic,
        CONSUMER_GROUP: group,
        PARTITION: str(message.partition),
        MESSAGE_ID: str(message.id),
        CLIENT_ID: message.member_id,
        "pgcg.attempt": message.attempt,
        "pgcg.epoch": message.epoch,
    }


# What the W3C TraceContext propagator accepts for version 00, no surrounding blanks.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
_FLAGS = [TraceFlags(flags) for flags in range(256)]
# The flag bits the SDK passes from a parent to an unsampled child (the W3C random-trace-id
# bit, in API releases that know it); the rest a child starts without.
_INHERITED_FLAGS = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
_propagator: tuple[object, bool] = (None, False)
_sampler: tuple[object, bool] = (None, False)


def _producer_context(headers: Mapping[str, str]) -> SpanContext | None:
    """The producer's span context from a message's headers, None if there is none valid:
    what process_span continues (tests hold it to the propagator API's answer)."""
    parsed = _parse_w3c(headers)
    return _extract(headers) if parsed is None else _remote(parsed)


def _remote(parsed: tuple[int, int, int]) -> SpanContext | None:
    trace_id, span_id, flags = parsed
    if not trace_id or not span_id:
        return None  # what the W3C propagator makes of all-zero ids: no parent
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=_FLAGS[flags])


def _parse_w3c(headers: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a plain version-00 traceparent, or None when the
    propagator API must decide.

    The fast path applies only when the configured propagators read nothing but the W3C
    headers (the default tracecontext,baggage) and the message has no tracestate:
    anything else (a tracestate, B3, another version) goes through the API. Baggage
    never mattered here: the handler runs in the consumer's own context.
    """
    match = _TRACEPARENT.fullmatch(headers["traceparent"])
    if match is None or "tracestate" in headers or not _w3c_propagation():
        return None
    return int(match[1], 16), int(match[2], 16), int(match[3], 16)


def _extract(headers: Mapping[str, str]) -> SpanContext | None:
    producer = trace.get_current_span(propagate.extract(headers)).get_span_context()
    return producer if producer.is_valid else None


def _w3c_propagation() -> bool:
    global _propagator
    propagator = propagate.get_global_textmap()
    if _propagator[0] is not propagator:
        fields = propagator.fields
        _propagator = (propagator, "traceparent" in fields and fields <= _W3C_FIELDS)
    return _propagator[1]


def _drops_unsampled_remote_parent() -> bool:
    global _sampler
    provider = trace.get_tracer_provider()
    if _sampler[0] is not provider:
        _sampler = (provider, drops_unsampled_remote_parent(getattr(provider, "sampler", None)))
    return _sampler[1]


def drops_unsampled_remote_parent(sampler: Any) -> bool:
    """Whether `sampler` drops every span whose remote parent was not sampled.

    The SDK's ParentBased keeps that choice in a private attribute: if a release renames
    it, the answer is False and the SDK decides each span itself, correct and slower.
    """
    try:
        from opentelemetry.sdk.trace.sampling import ParentBased, StaticSampler
    except ImportError:  # a provider that is not the SDK's: it decides each span itself
        return False
    if not isinstance(sampler, ParentBased) or (
        type(sampler).should_sample is not ParentBased.should_sample
    ):
        return False  # a subclass that decides for itself
    chosen = getattr(sampler, "_remote_parent_not_sampled", None)
    return isinstance(chosen, StaticSampler) and chosen.get_description() == "AlwaysOffSampler"


def failed(span: Span, exc: BaseException, description: str | None = None) -> None:
    if not span.is_recording():
        return
    span.set_status(Status(StatusCode.ERROR, description or f"{type(exc).__name__}: {exc}"))
    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
    if isinstance(exc, Exception):
        span.record_exception(exc)


# -- group protocol spans ------------------------------------------------------------------


def _group_attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {MESSAGING_SYSTEM: SYSTEM}
    if fields.get("group") is not None:
        out[CONSUMER_GROUP] = fields["group"]
    if fields.get("topic") is not None:
        out[DESTINATION] = fields["topic"]
    if fields.get("member_id") is not None:
        out[CLIENT_ID] = fields["member_id"]
    return out


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


@contextlib.contextmanager
def event_span(
    name: str,
    fields: Mapping[str, Any],
    links: list[Link] | None = None,
    *,
    start_time: int | None = None,
    **attributes: Any,
) -> Iterator[Span]:
    """A short INTERNAL span around one group-protocol event (log records inside it carry
    its trace id). Nothing at all when tracing is off. `start_time` (time.time_ns()) lets
    a span begin before the code knew it was worth one (a rebalance that changes nothing
    emits none)."""
    if not enabled():
        yield _NOOP
        return
    with tracer.start_as_current_span(name, links=links, start_time=start_time) as span:
        if span.is_recording():
            span.set_attributes({**_group_attributes(fields), **_clean(attributes)})
        try:
            yield span
        except BaseException as exc:
            # The SDK marks only Exceptions; a cancellation (shutdown, a lost session)
            # that cut the event short must not look like a success either.
            if not isinstance(exc, Exception) and span.is_recording():
                failed(span, exc, f"interrupted ({type(exc).__name__})")
            raise


def start_span(
    name: str, fields: Mapping[str, Any], *, start_time: int | None = None, **attributes: Any
) -> Span:
    """A span that outlives the call that starts it (a revocation, until the release)."""
    if not enabled():
        return _NOOP
    span = tracer.start_span(name, start_time=start_time)
    if span.is_recording():
        span.set_attributes({**_group_attributes(fields), **_clean(attributes)})
    return span


def link_to(traceparent: str | None) -> list[Link] | None:
    """A link to the span whose W3C traceparent is given (e.g. the rebalance that decided
    an assignment, recorded with it in the database)."""
    if not traceparent or not enabled():
        return None
    ctx = trace.get_current_span(propagate.extract({"traceparent": traceparent}))
    span_context = ctx.get_span_context()
    return [Link(span_context)] if span_context.is_valid else None


def current_traceparent() -> str | None:
    return current_headers().get("traceparent")
