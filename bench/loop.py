"""The second baseline of `pgcg bench drain`: a minimal asyncio + psycopg consumer loop, what
a team writes by hand instead of using a library (bench/loop_worker.py), run with the same
handler, the same concurrency and the same number of processes as pgcg's consumers.

It keeps no key order, so its handlers report order violations: that is the point of the
comparison (pgcg should cost about nothing next to it while keeping order). Its own table,
created here and filled with the same rows in the same INSERT batches as the raw baseline;
nothing depends on pgcg's message table layout.

Drain time runs from the `go` sent to every process (each connected already) to the last
`done` (the moment a process found the table empty, on the handlers' host clock).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgcg.bench.cpu import CpuMeter
from pgcg.bench.handlers import REPORT_DIR_ENV
from pgcg.bench.loop_worker import shape
from pgcg.bench.members import BenchError
from pgcg.bench.producers import run_producers
from pgcg.shared.db import connect_sync

_CREATE = """
CREATE TABLE {table} (
    id       bigserial PRIMARY KEY,
    key      text NOT NULL,
    payload  jsonb NOT NULL
)
"""
_INSERT = """
INSERT INTO {table} (key, payload)
SELECT * FROM unnest(%(keys)b::text[], %(payloads)b::text[]::jsonb[])
"""


def loop_baseline(
    dsn: str,
    postmaster: int | None,
    slices: list[list[tuple[str, str]]],
    *,
    handler: str,
    processes: int,
    concurrency: int,
    batch_size: int,
    table_name: str,
    timeout: float,
) -> dict[str, Any]:
    """`slices`: (key, JSON text) rows per producer connection; `handler`: module:function."""
    table = sql.Identifier("pgcg", table_name)
    messages = sum(len(s) for s in slices)
    with connect_sync(dsn) as conn:
        conn.execute(sql.SQL(_CREATE).format(table=table))
        try:
            insert = sql.SQL(_INSERT).format(table=table)

            def send(producer: psycopg.Connection[Any], batch: list[tuple[str, str]]) -> None:
                keys, payloads = zip(*batch, strict=True)
                producer.execute(insert, {"keys": list(keys), "payloads": list(payloads)})

            run_producers(dsn, slices, batch_size, send)
            conn.execute(sql.SQL("ANALYZE {}").format(table))  # as autovacuum would, soon
            drain = _drain(dsn, table_name, handler, processes, concurrency, timeout, postmaster)
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    connections, batch = shape(concurrency)
    drain.update(messages=messages, msgs_per_s=round(messages / drain["seconds"]),
                 processes=processes, connections_per_process=connections,
                 batch=batch, concurrency=concurrency)  # fmt: skip
    return {"drain": drain}


def _drain(
    dsn: str,
    table: str,
    handler: str,
    processes: int,
    concurrency: int,
    timeout: float,
    postmaster: int | None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pgcg-bench-loop-") as workdir:
        env = {**os.environ, REPORT_DIR_ENV: workdir}
        cmd = [sys.executable, "-m", "pgcg.bench.loop_worker", dsn, table, handler,
               str(concurrency)]  # fmt: skip
        procs = [
            subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(processes)
        ]
        # Past the timeout the workers are killed: a blocked read then ends at EOF.
        killer = threading.Timer(timeout + 60, lambda: [p.kill() for p in procs])
        killer.start()
        try:
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise BenchError(f"loop worker exited with {proc.wait()} before it was ready")
            meter = CpuMeter([p.pid for p in procs], postmaster)
            cpu_start = meter.sample()
            started = time.time()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            done = [_done_at(proc, started + timeout) for proc in procs]
            cpu = CpuMeter.report(cpu_start, meter.sample())
            for proc in procs:
                if proc.wait(timeout=30) != 0:
                    raise BenchError(f"loop worker exited with {proc.returncode}")
        finally:
            killer.cancel()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        reports = [_report(Path(workdir), proc.pid) for proc in procs]
    seconds = max(done) - started
    handled = sum(r.get("handled", 0) for r in reports)
    if cpu is not None and cpu.get("postgres_s") is not None and handled:
        ours = cpu["consumers_s"] + cpu["postgres_s"] + cpu["bench_s"]
        cpu["msgs_per_cpu_s"] = round(handled / ours) if ours > 0 else None
    return {
        "seconds": round(seconds, 3),
        "handled": handled,
        "key_order_violations": sum(r.get("violations", 0) for r in reports),
        "key_overlaps": sum(r.get("overlaps", 0) for r in reports),
        "cpu": cpu,
    }


def _done_at(proc: subprocess.Popen[str], deadline: float) -> float:
    assert proc.stdout is not None
    # A worker prints `done` once, when the table is empty; it never blocks on its pipe.
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"loop worker exited with {proc.wait()} before the table was empty")
        if line.startswith("done "):
            return float(line.split()[1])
    raise BenchError("the hand-written loop did not drain the table in time (--timeout)")


def _report(folder: Path, pid: int) -> dict[str, Any]:
    import json

    path = folder / f"{pid}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
