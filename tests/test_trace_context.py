"""The consumer's per-message trace context shortcuts give what the OTel API would.

process_span parses a plain W3C traceparent itself and, under a parent-based sampler,
answers an unsampled producer without the SDK (see shared/tracing.py). These tests hold
the shortcuts to the API's own answers, and check that anything unusual (tracestate,
baggage, another propagator, another sampler) still goes the API's way.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from pgcg.consumer.message import Message
from pgcg.shared import tracing
from tests.otel import Otel, install

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def otel() -> Otel:
    return install()


def message(headers: dict[str, str]) -> Message:
    return Message(
        id=7, topic="orders", partition=3, key="k", payload={}, headers=headers, attempt=1,
        enqueued_at=datetime.now(UTC), member_id="m-1", epoch=4,
    )  # fmt: skip


def by_the_api(headers: dict[str, str]) -> SpanContext | None:
    producer = trace.get_current_span(propagate.extract(headers)).get_span_context()
    return producer if producer.is_valid else None


hex_digits = st.text("0123456789abcdefABCDEF", min_size=0, max_size=34)
traceparents = st.one_of(
    # Well formed, any flags, including all-zero ids (invalid) and sampled or not.
    st.builds(
        lambda t, s, f: f"00-{t:032x}-{s:016x}-{f:02x}",
        st.integers(0, 2**128 - 1) | st.just(0),
        st.integers(0, 2**64 - 1) | st.just(0),
        st.integers(0, 255),
    ),
    # Near misses: other versions, upper case, blanks, suffixes, wrong lengths.
    st.builds(
        lambda v, t, s, f, tail: f"{v}-{t}-{s}-{f}{tail}",
        st.sampled_from(["00", "01", "ff", "0g", " 00"]),
        hex_digits,
        hex_digits,
        st.sampled_from(["00", "01", "03", "1", "0A"]),
        st.sampled_from(["", " ", "\t", "-", "-extra", "x"]),
    ),
    st.text(max_size=60),
)


@given(
    traceparent=traceparents,
    tracestate=st.none() | st.sampled_from(["", "vendor=abc", "a=1,b=2", "bad key=1"]),
    baggage=st.none() | st.sampled_from(["user=alice", ""]),
)
def test_the_traceparent_shortcut_reads_what_the_propagator_reads(
    traceparent: str, tracestate: str | None, baggage: str | None
) -> None:
    headers = {"traceparent": traceparent, "tenant": "t1"}
    if tracestate is not None:
        headers["tracestate"] = tracestate
    if baggage is not None:
        headers["baggage"] = baggage
    assert tracing._producer_context(headers) == by_the_api(headers)


def test_the_default_propagators_take_the_shortcut() -> None:
    # Otherwise the test above would compare the API with itself.
    assert tracing._w3c_propagation()


class VendorPropagator(TextMapPropagator):
    """A propagator reading its own header, as B3 or Jaeger's would."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[Any] = default_getter,
    ) -> Context:
        value = getter.get(carrier, "x-vendor-trace")
        if not value:
            return context or Context()
        trace_id, span_id = (int(part, 16) for part in value[0].split(":"))
        parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
        return trace.set_span_in_context(NonRecordingSpan(parent), context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[Any] = default_setter,
    ) -> None:
        pass

    @property
    def fields(self) -> set[str]:
        return {"x-vendor-trace"}


@pytest.fixture
def vendor_propagator() -> Iterator[None]:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(VendorPropagator())
    try:
        yield
    finally:
        propagate.set_global_textmap(previous)


@pytest.mark.usefixtures("vendor_propagator")
def test_other_propagators_are_asked() -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "x-vendor-trace": "abc:def"}
    producer = tracing._producer_context(headers)
    assert producer is not None
    assert (producer.trace_id, producer.span_id) == (0xABC, 0xDEF)


class Reconsidering(ParentBased):
    """A parent-based sampler that decides some unsampled parents' children itself."""

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        return ALWAYS_ON.should_sample(*args, **kwargs)


@pytest.mark.parametrize(
    ("sampler", "drops"),
    [
        (ParentBased(ALWAYS_ON), True),  # the SDK's default
        (ParentBasedTraceIdRatio(0.01), True),  # parentbased_traceidratio
        (ParentBased(ALWAYS_OFF), True),
        (ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON), False),
        (ALWAYS_ON, False),
        (TraceIdRatioBased(0.5), False),
        (Reconsidering(ALWAYS_ON), False),
        (None, False),
    ],
)
def test_which_samplers_drop_an_unsampled_producers_children(sampler: Any, drops: bool) -> None:
    assert tracing.drops_unsampled_remote_parent(sampler) is drops


@pytest.mark.parametrize("flags", [0x00, 0x02, 0x04, 0x06, 0xFE])
def test_an_unsampled_producer_continues_its_trace_unrecorded(otel: Otel, flags: int) -> None:
    # The tests' provider samples parent-based (the SDK default), so this takes the shortcut;
    # the SDK's own child of the same producer is what it must look like.
    trace_id = "5a" * 16
    headers = {"traceparent": f"00-{trace_id}-{SPAN_ID}-{flags:02x}"}
    span = tracing.process_span(message(headers), "g")
    span.end()
    by_the_sdk = trace.get_tracer("tests").start_span("x", context=propagate.extract(headers))
    assert not span.is_recording() and not by_the_sdk.is_recording()
    context, expected = span.get_span_context(), by_the_sdk.get_span_context()
    assert context.trace_id == expected.trace_id == int(trace_id, 16), "the trace goes on"
    assert context.trace_flags == expected.trace_flags
    assert context.trace_state == expected.trace_state
    assert context.is_remote is expected.is_remote is False
    assert context.span_id not in (0, int(SPAN_ID, 16))
    assert not [s for s in otel.finished() if s.context.trace_id == int(trace_id, 16)]


def test_a_sampled_producer_gets_a_recorded_child_with_a_link(otel: Otel) -> None:
    trace_id = "6b" * 16
    span = tracing.process_span(message({"traceparent": f"00-{trace_id}-{SPAN_ID}-01"}), "g")
    span.end()
    (recorded,) = [s for s in otel.finished() if s.context.trace_id == int(trace_id, 16)]
    assert recorded.name == "process orders"
    assert recorded.parent is not None and recorded.parent.span_id == int(SPAN_ID, 16)
    assert recorded.parent.is_remote
    assert [link.context.span_id for link in recorded.links] == [int(SPAN_ID, 16)]
    assert recorded.attributes is not None
    assert recorded.attributes["messaging.destination.partition.id"] == "3"
    assert recorded.attributes["pgcg.epoch"] == 4


@pytest.mark.parametrize(
    "headers",
    [
        {"tenant": "t1"},
        {"traceparent": f"00-{'7c' * 16}-{'0' * 16}-00"},  # an invalid (all-zero) span id
        {"traceparent": f"00-{'0' * 32}-{SPAN_ID}-00"},  # an invalid trace id
    ],
)
def test_a_message_without_valid_context_starts_a_trace(
    otel: Otel, headers: dict[str, str]
) -> None:
    span = tracing.process_span(message(headers), "g")
    span.end()
    assert span.get_span_context().trace_id != int("7c" * 16, 16)


@pytest.mark.parametrize(
    "traceparent",
    [f"00-{'0' * 32}-{SPAN_ID}-01", f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", "garbage"],
)
def test_an_invalid_traceparent_starts_a_trace_inside_an_application_span(
    otel: Otel, traceparent: str
) -> None:
    # As the propagator would have it: a message's context that is not valid is no
    # context, not the context the application happens to run the consumer in.
    with trace.get_tracer("tests").start_as_current_span("app") as app:
        span = tracing.process_span(message({"traceparent": traceparent}), "g")
        span.end()
    assert span.is_recording() or span.get_span_context().is_valid
    assert span.get_span_context().trace_id != app.get_span_context().trace_id
    (recorded,) = [
        s for s in otel.finished() if s.context.span_id == span.get_span_context().span_id
    ]
    assert recorded.parent is None
    assert not recorded.links
