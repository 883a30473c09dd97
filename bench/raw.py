"""The raw PostgreSQL limit on the same server: a plain table, batched INSERT, and a drain
with `DELETE … FOR UPDATE SKIP LOCKED … RETURNING` in batches of 100 from P connections.

No partitions, no ordering per key, no fencing: what any queue on this server could do at
best, so pgcg's numbers can be read as a ratio rather than against another machine.
Inserts use the same batches, producers and binary arrays as pgcg's enqueue.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from pgcg.bench.cpu import CpuMeter
from pgcg.bench.producers import run_producers
from pgcg.shared.db import connect_sync

DRAIN_BATCH = 100

_CREATE = """
CREATE TABLE {table} (
    id           bigserial PRIMARY KEY,
    key          text NOT NULL,
    payload      jsonb NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT now()
)
"""
_INSERT = """
INSERT INTO {table} (key, payload)
SELECT * FROM unnest(%(keys)b::text[], %(payloads)b::text[]::jsonb[])
"""
_DRAIN = """
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table} ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %(limit)s
) RETURNING *
"""


def raw_baseline(
    dsn: str,
    meter: CpuMeter,
    slices: list[list[tuple[str, str]]],
    *,
    batch_size: int,
    connections: int,
    table_name: str,
    timeout: float,
) -> dict[str, Any]:
    """`slices`: (key, JSON text) rows per producer connection, as in pgcg's enqueue."""
    table = sql.Identifier("pgcg", table_name)
    messages = sum(len(s) for s in slices)
    with connect_sync(dsn) as conn:
        conn.execute(sql.SQL(_CREATE).format(table=table))
        try:
            insert = sql.SQL(_INSERT).format(table=table)

            def send(producer: psycopg.Connection[Any], batch: list[tuple[str, str]]) -> None:
                keys, payloads = zip(*batch, strict=True)
                producer.execute(insert, {"keys": list(keys), "payloads": list(payloads)})

            insert_s = run_producers(dsn, slices, batch_size, send)
            drained, drain_s, cpu = _drain(
                dsn, sql.SQL(_DRAIN).format(table=table), connections, timeout, meter
            )
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    return {
        "insert": {"messages": messages, "seconds": round(insert_s, 3),
                   "msgs_per_s": round(messages / insert_s), "producers": len(slices),
                   "batch": batch_size},
        "drain": {"messages": drained, "seconds": round(drain_s, 3),
                  "msgs_per_s": round(drained / drain_s), "connections": connections,
                  "batch": DRAIN_BATCH, "cpu": cpu},
    }  # fmt: skip


def _drain(
    dsn: str, query: sql.Composed, connections: int, timeout: float, meter: CpuMeter
) -> tuple[int, float, dict[str, Any] | None]:
    conns = [connect_sync(dsn) for _ in range(connections)]
    # Sampled while the connections are open: a backend's CPU counts until it exits.
    counts = [0] * connections
    errors: list[BaseException] = []
    barrier = threading.Barrier(connections + 1)
    deadline = time.monotonic() + timeout

    def worker(n: int) -> None:
        conn = conns[n]
        try:
            barrier.wait()
            while time.monotonic() < deadline:
                rows = conn.execute(query, {"limit": DRAIN_BATCH}).fetchall()
                if not rows:
                    return
                counts[n] += len(rows)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(connections)]
    for t in threads:
        t.start()
    cpu_start = meter.sample()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu = CpuMeter.report(cpu_start, meter.sample(), sum(counts))
    for conn in conns:
        conn.close()
    if errors:
        raise errors[0]
    return sum(counts), elapsed, cpu
