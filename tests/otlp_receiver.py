"""A real OTLP/HTTP receiver for tests: what a collector would get from pgcg processes.

The bench's sink (bench/otlp_sink.py) takes POST /v1/traces with protobuf bodies
(optionally gzip or deflate), as the SDK's http/protobuf exporter sends them; this keeps
its spans as plain dicts with their resource's service.name and process.pid.
"""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from pgcg.bench.otlp_sink import OtlpSink

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpReceiver(OtlpSink):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, Any]] = []
        self._spans_lock = threading.Lock()

    def find(self, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """Spans named `name` whose top-level fields or attributes equal `match`."""
        with self._spans_lock:
            for request in self.take_requests():
                self.spans.extend(_spans(request))
            spans = list(self.spans)
        return [
            s
            for s in spans
            if (name is None or s["name"] == name)
            and all(s.get(k, s["attributes"].get(k)) == v for k, v in match.items())
        ]


def _spans(request: Any) -> list[dict[str, Any]]:
    spans = []
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                spans.append(
                    {
                        "name": span.name,
                        "kind": KINDS.get(span.kind, str(span.kind)),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "attributes": _attributes(span.attributes),
                        "links": [(x.trace_id.hex(), x.span_id.hex()) for x in span.links],
                        "events": [e.name for e in span.events],
                        "status": span.status.code,
                        "service": resource.get("service.name"),
                        "pid": resource.get("process.pid"),
                    }
                )
    return spans
