"""What tracing costs a consumer: drain N messages in-process with a no-op handler, with
tracing off, on with every trace sampled, and on at 1 %; and with tracing off but
messages carrying trace context (what the header alone costs).

    python -m pgcg.bench.tracing_overhead [--messages 20000] [--repeats 3] [--work-ms 0]

Each run is a fresh process (an OTel provider is installed once per process) on a fresh
database of one throwaway PostgreSQL, and the modes are interleaved so a change in the
machine's load hits them alike. With tracing on, every message carries its own W3C
traceparent (sampled at the mode's ratio) as in production, and spans go through a
BatchSpanProcessor to an exporter that drops them (the export's network cost is the
collector's, not the consumer's). Reported per mode, as the median of the runs: messages
per second from the assignment of the partitions to the last handler call, and the CPU
time the consumer process (all its threads, so the span processor's too) spent per
message over that window; then how much more of each tracing costs than off. On a
shared or busy machine the wall-clock rate swings with other load; the CPU time per
message is the steadier measure of what tracing adds. --work-ms gives the handler that
much (async) work, a closer picture of a real handler than the no-op, which shows pgcg's
own cost alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

# mode -> (the consumer's sampling ratio or None: no tracing, the producers' ratio or None:
# no trace context in the messages). "headers" is a consumer that does not trace, fed by
# traced producers: what carrying the context costs, apart from what tracing costs.
MODES: dict[str, tuple[float | None, float | None]] = {
    "off": (None, None),
    "headers": (None, 0.01),
    "on-1%": (0.01, 0.01),
    "on-100%": (1.0, 1.0),
}
TOPIC = "bench"
GROUP = "bench"
PARTITIONS = 16
KEYS = 1000


# -- one run (child process) ----------------------------------------------------------------


def _tracing(ratio: float | None) -> Any:
    if ratio is None:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    class Dropping(SpanExporter):
        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    exporter = Dropping()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(ratio))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 17))
    trace.set_tracer_provider(provider)
    return provider, exporter


def run_once(dsn: str, mode: str, messages: int, work_ms: float = 0.0) -> dict[str, Any]:
    import anyio

    consumer_ratio, producer_ratio = MODES[mode]
    tracing = _tracing(consumer_ratio)

    import psycopg

    from pgcg.bench.drain import DrainOptions, make_workload
    from pgcg.consumer.message import Message
    from pgcg.consumer.service import Consumer
    from pgcg.shared.producer import enqueue_many_sync
    from pgcg.shared.queries import Queries
    from pgcg.shared.settings import Settings

    coordinator = Queries("coordinator")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, PARTITIONS))
        # Each message its own trace, as if a traced request had enqueued it, sampled at
        # the producers' ratio (the consumers' parent-based sampler follows it).
        workload = make_workload(DrainOptions(messages=messages, keys=KEYS), producer_ratio)
        for start in range(0, messages, 1000):
            enqueue_many_sync(conn, TOPIC, workload[start : start + 1000])

    handled = 0
    done = anyio.Event()

    async def handle(message: Message) -> None:
        nonlocal handled
        if work_ms:
            await anyio.sleep(work_ms / 1000)
        handled += 1
        if handled == messages:
            done.set()

    async def main() -> float:
        settings = Settings(heartbeat_interval=1.0, session_timeout=10)
        consumer = Consumer(settings, group=GROUP, topic=TOPIC, handler=handle, dsn=dsn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            with psycopg.connect(dsn, autocommit=True) as conn:
                started = time.perf_counter()
                cpu_started = time.process_time()
                conn.execute(
                    coordinator.assign,
                    {
                        "group": GROUP,
                        "topic": TOPIC,
                        "partitions": list(range(PARTITIONS)),
                        "members": [consumer.member_id] * PARTITIONS,
                    },
                )
                conn.execute(coordinator.notify_group, {"group": GROUP})
            await done.wait()
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            consumer.stop()
        return elapsed, cpu

    elapsed, cpu = anyio.run(main)
    spans = 0
    if tracing is not None:
        provider, exporter = tracing
        provider.force_flush()
        spans = exporter.exported
        provider.shutdown()
    return {"mode": mode, "messages": messages, "work_ms": work_ms, "seconds": elapsed,
            "rate": messages / elapsed, "cpu_us": cpu / messages * 1e6,
            "spans": spans}  # fmt: skip


# -- the comparison (parent process) -------------------------------------------------------------


def compare(messages: int, repeats: int, work_ms: float = 0.0) -> dict[str, Any]:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from pgcg.bench.throwaway import ThrowawayPostgres
    from pgcg.shared.migrate import migrate

    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with ThrowawayPostgres() as server:
        template = "bench_template"
        with psycopg.connect(server.url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{template}"')
        migrate(make_conninfo(server.url, dbname=template))
        for round_ in range(repeats):
            for mode in MODES:
                name = f"bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(server.url, autocommit=True) as admin:
                    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                dsn = make_conninfo(server.url, dbname=name)
                child = subprocess.run(
                    [sys.executable, "-m", "pgcg.bench.tracing_overhead", "--child", mode,
                     "--dsn", dsn, "--messages", str(messages), "--work-ms", str(work_ms)],
                    env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
                    capture_output=True, text=True, check=True, timeout=600,
                )  # fmt: skip
                result = json.loads(child.stdout.strip().splitlines()[-1])
                runs[mode].append(result)
                print(
                    f"round {round_ + 1}: {mode:<8} {result['rate']:>8.0f} msg/s "
                    f"{result['cpu_us']:>7.1f} us CPU/msg "
                    f"({result['seconds']:.2f}s, {result['spans']} spans)",
                    file=sys.stderr,
                )
                with psycopg.connect(server.url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    rate = {mode: statistics.median(r["rate"] for r in rs) for mode, rs in runs.items()}
    cpu = {mode: statistics.median(r["cpu_us"] for r in rs) for mode, rs in runs.items()}
    return {
        "messages": messages,
        "repeats": repeats,
        "work_ms": work_ms,
        "median_rate_msg_s": {m: round(v) for m, v in rate.items()},
        "median_cpu_us_per_msg": {m: round(v, 1) for m, v in cpu.items()},
        "wall_time_vs_off": {
            m: f"{(rate['off'] / v - 1) * 100:+.1f}%" for m, v in rate.items() if m != "off"
        },
        "cpu_per_msg_vs_off": {
            m: f"{(v / cpu['off'] - 1) * 100:+.1f}%" for m, v in cpu.items() if m != "off"
        },
        # What the consumer's tracing adds to a consumer that already gets traced messages.
        "cpu_per_msg_vs_headers": {
            m: f"{(v / cpu['headers'] - 1) * 100:+.1f}%"
            for m, v in cpu.items()
            if m.startswith("on")
        },
        "runs": runs,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-ms", type=float, default=0.0, help="async work per message")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_once(args.dsn, args.child, args.messages, args.work_ms)))
        return
    report = compare(args.messages, args.repeats, args.work_ms)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
