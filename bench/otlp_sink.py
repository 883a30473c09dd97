"""Where traced bench consumers export their spans and metrics: an OTLP/HTTP endpoint in
the bench.

A collector normally runs on another machine, so the bench should spend as little of
the shared CPUs on it as it can while the consumers drain: the sink keeps each request
body as it came and answers at once; the spans are decoded only when asked for, after
the drain. The consumers still pay what they would in production: encoding the spans
and sending them over HTTP.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

EMPTY_RESPONSE = b""  # an Export*ServiceResponse with nothing rejected


class OtlpSink:
    def __init__(self) -> None:
        self._bodies: list[tuple[str, bytes]] = []
        self._metric_bodies: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take(self) -> dict[str, int]:
        """Decode and forget what arrived so far: requests, and spans by name."""
        requests = self.take_requests()
        counts: dict[str, int] = {"requests": len(requests)}
        for request in requests:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        counts[span.name] = counts.get(span.name, 0) + 1
        return counts

    def take_requests(self) -> list[Any]:
        """The ExportTraceServiceRequests that arrived so far, decoded; forgotten here."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        with self._lock:
            bodies, self._bodies = self._bodies, []
        return [ExportTraceServiceRequest.FromString(_decoded(*body)) for body in bodies]

    def take_metrics(self) -> dict[str, int]:
        """Decode and forget the metrics that arrived so far: requests, and per instrument
        the messages it counted (a counter's sum, a histogram's count) over every process.

        Exports are cumulative, so each process's last export of a series holds its total;
        the processes tell apart by their resource (process.pid)."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        with self._lock:
            bodies, self._metric_bodies = self._metric_bodies, []
        latest: dict[tuple[str, str, str], int] = {}
        for body in bodies:
            request = ExportMetricsServiceRequest.FromString(_decoded(*body))
            for resource_metrics in request.resource_metrics:
                process = str(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        points = [(str(p.attributes), p.as_int) for p in metric.sum.data_points]
                        points += [(str(p.attributes), p.count)
                                   for p in metric.histogram.data_points]  # fmt: skip
                        for series, value in points:
                            key = (metric.name, process, series)
                            latest[key] = max(latest.get(key, 0), value)
        counts: dict[str, int] = {"requests": len(bodies)}
        for (name, _, _), value in latest.items():
            counts[name] = counts.get(name, 0) + value
        return counts

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                path = self.path.rstrip("/")
                if path.endswith("/v1/traces"):
                    with sink._lock:
                        sink._bodies.append((encoding, body))
                elif path.endswith("/v1/metrics"):
                    with sink._lock:
                        sink._metric_bodies.append((encoding, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(EMPTY_RESPONSE)))
                self.end_headers()
                self.wfile.write(EMPTY_RESPONSE)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _decoded(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body
