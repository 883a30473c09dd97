"""The small HTTP endpoint for Kubernetes and Prometheus, on PGCG_HTTP_PORT:

  /healthz  200 while the event loop makes progress (liveness), 503 once it has not run
            for longer than the stall bound: a wedged process gets restarted
  /readyz   200 when the process can do its job, else 503 with the reason (readiness):
            a consumer holds a valid lease and the partitions its group assigns it
            (or the group has none for it: consumer/readiness.py); a coordinator is
            connected and either leads or stands by
  /metrics  Prometheus text (or OpenMetrics, by Accept header) of the MeterProvider

A stdlib server in a daemon thread: probes keep answering while the event loop is busy,
and nothing here can block the loop. The readiness callback only reads process state.
Because the server runs in its own thread it would answer 200 for a loop that a handler
blocked for good; a LoopWatch task on the loop stamps the time, and /healthz reports how
long ago the loop last ran once that is past the bound.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("pgcg.health")

Readiness = Callable[[], tuple[bool, str]]


class LoopWatch:
    """Proof that the event loop runs: `run()` (a task on the loop) stamps the monotonic
    time every `interval`; `alive()` (any thread) fails once the stamp is older than
    `stall_after`. A loop blocked by a handler that never yields, a deadlock on a lock
    taken in the loop, or a CPU-bound call stops the stamps and so fails the probe."""

    def __init__(self, stall_after: float, interval: float | None = None) -> None:
        if not math.isfinite(stall_after) or stall_after <= 0:
            raise ValueError("stall_after must be finite seconds > 0")
        self.stall_after = stall_after
        self.interval = interval if interval is not None else min(1.0, stall_after / 4)
        # Counted from creation: a loop that never starts the watch is stalled too.
        self._stamp = time.monotonic()

    async def run(self) -> None:
        import anyio

        while True:
            self._stamp = time.monotonic()
            await anyio.sleep(self.interval)

    def alive(self) -> tuple[bool, str]:
        age = time.monotonic() - self._stamp
        if age > self.stall_after:
            return False, (
                f"event loop stalled: it last ran {age:.1f}s ago (bound {self.stall_after:g}s)"
            )
        return True, "event loop running"


class HealthServer:
    def __init__(
        self,
        port: int,
        *,
        ready: Readiness,
        registry: CollectorRegistry | None = None,
        alive: Readiness | None = None,
        host: str = "0.0.0.0",  # probes come from the kubelet, to the pod IP
    ) -> None:
        self.host = host
        self.requested_port = port
        self.ready = ready
        self.alive = alive or (lambda: (True, "serving"))
        self.registry = registry
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> int:
        server = ThreadingHTTPServer((self.host, self.requested_port), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="pgcg-http", kwargs={"poll_interval": 0.2}
        )
        self._thread.daemon = True
        self._thread.start()
        log.info(
            "serving /healthz, /readyz and /metrics on port %s",
            self.port,
            extra={"action": "http_started", "port": self.port},
        )
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(
    port: int,
    *,
    ready: Readiness,
    registry: CollectorRegistry | None = None,
    alive: Readiness | None = None,
) -> Iterator[HealthServer | None]:
    """The endpoint for the duration of the block, or nothing when port is 0."""
    if not port:
        yield None
        return
    with HealthServer(port, ready=ready, registry=registry, alive=alive) as server:
        yield server


def _no_metrics_reason() -> str:
    from pgcg.shared.extras import installed

    if not installed("opentelemetry.exporter.prometheus"):
        return "no metrics: /metrics needs pgcg's 'otel' extra (pip install 'pgcg[otel]')\n"
    return "no metrics: the application installed its own MeterProvider\n"


def _handler(owner: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pgcg"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                try:
                    ok, detail = owner.alive()
                except Exception as exc:  # a probe must answer, whatever went wrong
                    ok, detail = False, f"liveness check failed: {exc}"
                self._reply(200 if ok else 503, "ok\n" if ok else f"unhealthy: {detail}\n")
            elif path == "/readyz":
                try:
                    ok, detail = owner.ready()
                except Exception as exc:  # a probe must answer, whatever went wrong
                    ok, detail = False, f"readiness check failed: {exc}"
                self._reply(200 if ok else 503, f"{'ready' if ok else 'not ready'}: {detail}\n")
            elif path == "/metrics":
                self._metrics()
            else:
                self._reply(404, b"not found: try /healthz, /readyz or /metrics\n")

        def _metrics(self) -> None:
            if owner.registry is None:
                self._reply(404, _no_metrics_reason())
                return
            from prometheus_client.exposition import choose_encoder

            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(owner.registry), content_type)

        def _reply(
            self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args, extra={"action": "http_request"})

    return Handler
