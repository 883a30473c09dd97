"""A stand-in for the user's web application, run as its own process by the tests: it
sets up tracing from OTEL_* the way pgcg does, and enqueues inside a request span.

    python -m tests.web_app DSN TOPIC COUNT   -> prints the request's trace id
"""

from __future__ import annotations

import sys

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from pgcg.shared.db import connect_sync
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.tracing import setup_tracing


def main() -> None:
    dsn, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert setup_tracing("web-app"), "set OTEL_TRACES_EXPORTER"
    tracer = trace.get_tracer("web-app")
    messages = [OutgoingMessage(f"key-{i}", {"seq": i}) for i in range(count)]
    with (
        tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER) as request,
        connect_sync(dsn) as conn,
    ):
        enqueue_many_sync(conn, topic, messages)
    print(f"{request.get_span_context().trace_id:032x}", flush=True)
    trace.get_tracer_provider().shutdown()  # type: ignore[attr-defined]  # flush the batch


if __name__ == "__main__":
    main()
