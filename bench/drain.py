"""`pgcg bench drain`: enqueue N messages over K keys, drain them in key order with P real
consumer processes, and compare with the raw PostgreSQL limit measured on the same server
in the same run.

With `--tracing off,1,0.01` each handler drains once per tracing mode: the consumers
export over OTLP/HTTP to a sink in the bench (bench/otlp_sink.py) with a parent-based
ratio sampler, every message carries its own W3C traceparent as if a traced request had
enqueued it (sampled at the same ratio), and the ratios compare each mode with off. In
such a run every pgcg drain, off included, also records pgcg's metrics per message and
exports them over OTLP to the same sink, as a consumer with a metrics exporter does in
production: the off drain differs from the traced ones by tracing alone. With `repeat`
the modes take turns (off, 1 %, off, 1 % …) and each ratio is the median of its rounds,
with their spread.

run_drains compares backlog sizes and servers in one invocation: every size drains on the
same server, the servers one after the other (each a throwaway server of its own), and
the ratios compare each pgcg drain with the same handler's at another size or on another
server.

Phases, each on its own fresh topic or table:
  raw      batched INSERT into a plain table, then DELETE … SKIP LOCKED … RETURNING
  <handler> for each handler:
           loop: the same rows in a plain table of its own, drained by a hand-written
                 asyncio + psycopg loop (bench/loop.py) in P processes with the same
                 handler and concurrency, without key order
           pgcg: batched enqueue (pgcg.enqueue), then P consumers drain with the
                 partitions assigned directly and evenly (the coordinator's `assign`)
           groups (with --groups G > 1): the same on a fresh topic drained by G groups
                 at once, P consumers each; every group handles every message, and each
                 group's drain rate and messages per consumer CPU-second are reported
                 beside the one-group drain's

Drain time runs from the commit of the assignment to the first poll that finds nothing
left for the group (its completions against the topic's offsets, at most `poll_interval`
apart near the end: see _wait_empty), bounded by `timeout`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pgcg.bench.cpu import CpuMeter, postmaster_pid
from pgcg.bench.database import (
    BenchDatabase,
    bench_database,
    drop_topic,
    unfinished,
    unique_suffix,
)
from pgcg.bench.handlers import HANDLERS
from pgcg.bench.loop import loop_baseline
from pgcg.bench.members import BenchError, ConsumerProcesses
from pgcg.bench.otlp_sink import OtlpSink
from pgcg.bench.producers import run_producers, split_by_key
from pgcg.bench.raw import raw_baseline
from pgcg.shared.db import connect_sync
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries

COORD = Queries("coordinator")

PARKED_RETRY_BASE = 0.5  # seconds (full jitter): the parked handler's first retry

TARGETS = {"drain_noop_msgs_per_s": 20_000, "enqueue_msgs_per_s": 100_000}


@dataclass
class DrainOptions:
    messages: int = 100_000
    keys: int = 1_000
    consumers: int = 2
    partitions: int = 16
    concurrency: int = 100
    prefetch: int = 1_000
    handlers: list[str] = field(default_factory=lambda: ["noop", "sleep1ms"])
    batch_size: int = 1_000
    producers: int = 1
    timeout: float = 300.0
    poll_interval: float = 0.05
    raw: bool = True
    loop: bool = True
    server: str | None = None  # a throwaway server's bin/ (bench/throwaway.py server_bin)
    database_url: str | None = None
    profile_dir: str | None = None
    statement_stats: bool = False
    tracing: list[float | None] = field(default_factory=lambda: [None])  # None: off
    groups: int = 1  # > 1: also drain the same workload with that many groups at once
    repeat: int = 1  # rounds of the tracing modes, interleaved


def parse_tracing(text: str) -> list[float | None]:
    """`off`, `on` (every trace sampled) or sampling ratios, comma-separated: "off,1,0.01"."""
    modes: list[float | None] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part == "off":
            mode = None
        elif part == "on":
            mode = 1.0
        else:
            try:
                mode = float(part[:-1]) / 100 if part.endswith("%") else float(part)
            except ValueError:
                mode = -1.0
            if not 0 < mode <= 1:
                raise ValueError(
                    f"--tracing: {part!r} is not off, on, a ratio in (0, 1] or a percentage "
                    "such as 1%"
                )
        if mode not in modes:
            modes.append(mode)
    return modes


def tracing_label(ratio: float | None) -> str:
    return "off" if ratio is None else f"{ratio * 100:g}%"


def run_name(handler: str, ratio: float | None) -> str:
    """The handler alone when tracing is off, so untraced results keep their names."""
    return handler if ratio is None else f"{handler}+tracing-{tracing_label(ratio)}"


def make_workload(opts: DrainOptions, tracing: float | None = None) -> list[OutgoingMessage]:
    """Keys round-robin, so every key has N/K messages spread over the whole run; `seq` is
    the producer's order, which the handlers check per key.

    With tracing each message gets the traceparent a traced request would have given it:
    its own trace, sampled as a TraceIdRatioBased sampler at that ratio would decide.
    """
    if tracing is None:
        return [OutgoingMessage(f"key-{i % opts.keys}", {"seq": i}) for i in range(opts.messages)]
    ids = random.Random(opts.messages)
    bound = round(tracing * (1 << 64))
    out = []
    for i in range(opts.messages):
        trace_id, span_id = ids.getrandbits(128) or 1, ids.getrandbits(64) or 1
        flags = "03" if trace_id & ((1 << 64) - 1) < bound else "02"
        traceparent = f"00-{trace_id:032x}-{span_id:016x}-{flags}"
        out.append(
            OutgoingMessage(
                f"key-{i % opts.keys}", {"seq": i}, headers={"traceparent": traceparent}
            )
        )
    return out


def _check(opts: DrainOptions) -> None:
    if min(opts.messages, opts.keys, opts.consumers, opts.producers, opts.batch_size,
           opts.groups, opts.repeat) < 1:  # fmt: skip
        raise ValueError(
            "messages, keys, consumers, producers, batch size, groups and repeat must be >= 1"
        )
    unknown = [h for h in opts.handlers if h not in HANDLERS]
    if unknown:
        raise ValueError(f"unknown handler(s) {unknown}; choose from {sorted(HANDLERS)}")


def run_drain(opts: DrainOptions) -> dict[str, Any]:
    _check(opts)
    with bench_database(opts.database_url, opts.server) as db:
        return _run_on(db, opts)


def parse_list(text: str, option: str) -> list[str]:
    """A comma-separated option's values, in order, each once."""
    values: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ValueError(f"{option}: {text!r} has an empty item")
        if part not in values:
            values.append(part)
    return values


def run_drains(opts: DrainOptions, sizes: list[int], servers: list[str | None]) -> dict[str, Any]:
    """The drain once per backlog size on each server: every size on the same server, the
    servers one after the other. One size on one server is run_drain's result as it is;
    otherwise each drain's result is in `runs`, and `ratios` compares them (see
    _cross_ratios)."""
    if len(sizes) == 1 and len(servers) == 1:
        return run_drain(replace(opts, messages=sizes[0], server=servers[0]))
    if opts.database_url is not None and len(servers) > 1:
        raise ValueError("--server with several servers starts throwaway ones: drop --database-url")
    for size in sizes:
        _check(replace(opts, messages=size))
    result: dict[str, Any] = {
        "config": {**_config(opts), "messages": sizes, "server": servers},
        "host": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "runs": [],
    }
    labels: list[str] = []
    for server in servers:
        with bench_database(opts.database_url, server) as db:
            label = _server_label(db.server_info()["version"], labels)
            labels.append(label)
            for size in sizes:
                run = _run_on(db, replace(opts, messages=size, server=server))
                run["label"] = {"server": label, "messages": size}
                result["runs"].append(run)
    result["host"]["loadavg_at_end"] = os.getloadavg()
    result["ratios"] = _cross_ratios(result["runs"])
    return result


def _server_label(version: str, taken: list[str]) -> str:
    """pg15, pg18 …; a second server of the same major version gets a suffix."""
    label = f"pg{version.split()[0].split('.')[0]}"
    n = 2
    while label in taken:
        label, n = f"{label.split('_')[0]}_{n}", n + 1
    return label


def _config(opts: DrainOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(opts).items() if k != "database_url"}


def _run_on(db: BenchDatabase, opts: DrainOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"config": _config(opts)}
    if opts.statement_stats:
        result["config"]["statement_stats"] = db.enable_statement_stats()
        opts.statement_stats = result["config"]["statement_stats"]
    result["server"] = db.server_info()
    result["host"] = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    if opts.raw:
        workload = make_workload(opts)
        rows = [(m.key, json.dumps(m.payload, separators=(",", ":"))) for m in workload]
        result["raw"] = raw_baseline(
            db.dsn,
            CpuMeter([], postmaster_pid(db.throwaway.pgdata) if db.throwaway else None),
            split_by_key(rows, lambda n: n % opts.keys, opts.producers),
            batch_size=opts.batch_size,
            connections=opts.consumers,
            table_name=f"bench_raw_{unique_suffix()}",
            timeout=opts.timeout,
        )
    result["pgcg"] = {}
    if opts.loop:
        result["loop"] = {}
    traced = any(mode is not None for mode in opts.tracing)
    rounds: list[dict[str, Any]] = [{} for _ in range(opts.repeat)]
    with OtlpSink() if traced else nullcontext() as sink:
        for handler in opts.handlers:
            if opts.loop and handler != "parked":
                result["loop"][handler] = _loop_run(db, opts, handler)
            for round_ in rounds:
                for mode in opts.tracing:
                    round_[run_name(handler, mode)] = _pgcg_run(
                        db, opts, handler, make_workload(opts, mode), mode, sink
                    )
            # The first round is the one the other baselines compare with.
            result["pgcg"].update(rounds[0])
            if opts.groups > 1:
                result.setdefault("groups", {})[handler] = _groups_run(db, opts, handler)
    if opts.repeat > 1:
        result["rounds"] = rounds
    result["host"]["loadavg_at_end"] = os.getloadavg()
    result["ratios"] = _ratios(result)
    result["targets"] = _targets(result)
    return result


def _loop_run(db: BenchDatabase, opts: DrainOptions, handler: str) -> dict[str, Any]:
    workload = make_workload(opts)
    rows = [(m.key, json.dumps(m.payload, separators=(",", ":"))) for m in workload]
    return loop_baseline(
        db.dsn,
        postmaster_pid(db.throwaway.pgdata) if db.throwaway else None,
        split_by_key(rows, lambda n: n % opts.keys, opts.producers),
        handler=HANDLERS[handler],
        processes=opts.consumers,
        concurrency=opts.concurrency,
        batch_size=opts.batch_size,
        table_name=f"bench_loop_{unique_suffix()}",
        timeout=opts.timeout,
    )


def _pgcg_run(
    db: BenchDatabase,
    opts: DrainOptions,
    handler: str,
    workload: list[OutgoingMessage],
    tracing: float | None = None,
    sink: OtlpSink | None = None,
) -> dict[str, Any]:
    suffix = unique_suffix()
    topic, group = f"bench_{suffix}", f"bench-{suffix}"
    with connect_sync(db.dsn) as conn:
        conn.execute("SELECT pgcg.create_topic(%s, %s)", (topic, opts.partitions))
    try:
        enqueue = _enqueue(db.dsn, topic, opts, workload)
        drain = _drain(db, opts, handler, topic, group, tracing, sink)
        if "spans_exported" in drain:
            # Spans the consumers should have exported: a shortfall means the SDK's queue
            # dropped some (OTEL_BSP_MAX_QUEUE_SIZE), and the mode's cost is understated.
            drain["spans_exported"]["sampled_messages"] = sum(
                1 for m in workload if int(m.headers["traceparent"][-2:], 16) & 1
            )
    finally:
        drop_topic(db.dsn, topic, group)
    return {"handler": handler, "tracing": tracing_label(tracing), "enqueue": enqueue,
            "drain": drain}  # fmt: skip


def _groups_run(db: BenchDatabase, opts: DrainOptions, handler: str) -> dict[str, Any]:
    """The same workload on a fresh topic drained by `opts.groups` groups at once, each
    with its own P consumers: every group handles every message, at its own pace."""
    suffix = unique_suffix()
    topic = f"bench_{suffix}"
    names = [f"bench-{suffix}-g{n}" for n in range(opts.groups)]
    with connect_sync(db.dsn) as conn:
        conn.execute("SELECT pgcg.create_topic(%s, %s)", (topic, opts.partitions))
    try:
        enqueue = _enqueue(db.dsn, topic, opts, make_workload(opts))
        by_group, cpu = _drain_groups(db, opts, handler, topic, names)
    finally:
        for name in names[:-1]:
            drop_topic(db.dsn, topic, name, keep_topic=True)
        drop_topic(db.dsn, topic, names[-1])
    handled = opts.messages * opts.groups
    slowest = max(d["seconds"] for d in by_group.values())
    return {
        "handler": handler,
        "groups": opts.groups,
        "enqueue": enqueue,
        "by_group": by_group,
        # Every group together: messages handled (each message once per group) until the
        # slowest group was done, and the CPU of every consumer and the server meanwhile.
        "all": {
            "handled": handled,
            "seconds": slowest,
            "msgs_per_s": round(handled / slowest),
            "cpu": cpu,
            "msgs_per_consumer_cpu_s": _per_consumer_cpu_s(handled, cpu),
        },
    }


def _drain_groups(
    db: BenchDatabase, opts: DrainOptions, handler: str, topic: str, names: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    settings = {"concurrency": opts.concurrency, "prefetch": opts.prefetch}
    postmaster = postmaster_pid(db.throwaway.pgdata) if db.throwaway else None
    with (
        tempfile.TemporaryDirectory(prefix="pgcg-bench-") as workdir,
        connect_sync(db.dsn) as conn,
    ):
        with contextlib.ExitStack() as stack:
            groups = []
            for name in names:
                folder = Path(workdir) / name
                folder.mkdir()
                groups.append(stack.enter_context(ConsumerProcesses(
                    db.dsn, group=name, topic=topic, handler=HANDLERS[handler],
                    count=opts.consumers, workdir=folder, settings=settings,
                    env=_tracing_env(None, None),
                )))  # fmt: skip
            member_ids = {g.group: g.wait_joined(conn) for g in groups}
            meters = {g.group: CpuMeter([p.pid for p in g.procs], None) for g in groups}
            every = CpuMeter([p.pid for g in groups for p in g.procs], postmaster)
            starts = {name: meter.sample() for name, meter in meters.items()}
            every_start = every.sample()
            partitions = list(range(opts.partitions))
            with conn.transaction():
                for name, members in member_ids.items():
                    conn.execute(COORD.assign, {
                        "group": name, "topic": topic, "partitions": partitions,
                        "members": [members[p % len(members)] for p in partitions],
                    })  # fmt: skip
                    conn.execute(COORD.notify_group, {"group": name})
            started = time.perf_counter()
            wall_started = time.time()
            done = _wait_groups(
                conn, topic, meters, started, started + opts.timeout, opts.poll_interval
            )
            cpu = CpuMeter.report(every_start, every.sample(), opts.messages * len(names))
            late = [name for name in names if name not in done]
            if late:
                raise BenchError(
                    f"{handler}: groups {', '.join(late)} still had messages unfinished after "
                    f"{opts.timeout}s (--timeout)"
                )
        by_group = {}
        for g in groups:
            seconds, end = done[g.group]
            summary = _summarise(opts, seconds, wall_started, g.reports())
            summary["cpu"] = CpuMeter.report(starts[g.group], end)
            summary["msgs_per_consumer_cpu_s"] = _per_consumer_cpu_s(opts.messages, summary["cpu"])
            by_group[g.group] = summary
    return by_group, cpu


def _wait_groups(
    conn: Any,
    topic: str,
    meters: dict[str, CpuMeter],
    started: float,
    deadline: float,
    interval: float,
) -> dict[str, tuple[float, Any]]:
    """Poll until every group finished; per group, seconds since `started` when it was
    seen done and a CPU sample of its consumers then. Polls as _wait_empty does, on what
    the group furthest behind has left."""
    done: dict[str, tuple[float, Any]] = {}
    previous: tuple[float, int] | None = None
    while True:
        now = time.perf_counter()
        left = unfinished(conn, topic)
        for name, meter in meters.items():
            if name not in done and left.get(name, 1) == 0:
                done[name] = (now - started, meter.sample())
        most = max((n for name, n in left.items() if name not in done), default=0)
        if len(done) == len(meters) or now > deadline:
            return done
        wait = max(interval, 0.2)
        if previous is not None and previous[1] > most:
            rate = (previous[1] - most) / (now - previous[0])
            wait = min(max(most / rate / 2, interval), 2.0)
        previous = (now, most)
        time.sleep(wait)


def _per_consumer_cpu_s(messages: int, cpu: dict[str, Any] | None) -> int | None:
    """Messages per CPU-second of the consumer processes alone (the server's CPU is
    shared by every group, so only this one can be told apart per group)."""
    if not cpu or not cpu.get("consumers_s"):
        return None
    return round(messages / cpu["consumers_s"])


def _tracing_env(tracing: float | None, sink: OtlpSink | None) -> dict[str, str]:
    """Without a sink, neither traces nor metrics (the no-op meter). With one, metrics are
    exported to it whatever the mode, so a traced drain and its off drain differ by
    tracing alone; the export interval stays the SDK's default, as in production."""
    if sink is None:
        return {"OTEL_TRACES_EXPORTER": "none"}
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
    }
    if tracing is None:
        return {**env, "OTEL_TRACES_EXPORTER": "none"}
    return {
        **env,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(tracing),
    }


def _enqueue(
    dsn: str, topic: str, opts: DrainOptions, workload: list[OutgoingMessage]
) -> dict[str, Any]:
    slices = split_by_key(workload, lambda n: n % opts.keys, opts.producers)
    elapsed = run_producers(
        dsn, slices, opts.batch_size, lambda conn, batch: enqueue_many_sync(conn, topic, batch)
    )
    return {"messages": len(workload), "batch": opts.batch_size, "producers": opts.producers,
            "seconds": round(elapsed, 3), "msgs_per_s": round(len(workload) / elapsed)}  # fmt: skip


def _drain(
    db: BenchDatabase,
    opts: DrainOptions,
    handler: str,
    topic: str,
    group: str,
    tracing: float | None = None,
    sink: OtlpSink | None = None,
) -> dict[str, Any]:
    settings: dict[str, Any] = {"concurrency": opts.concurrency, "prefetch": opts.prefetch}
    if handler == "parked":
        # The failed first deliveries come back soon: the drain is the parked queue's, not
        # a backoff's.
        settings["retry_base"] = PARKED_RETRY_BASE
    with (
        tempfile.TemporaryDirectory(prefix="pgcg-bench-") as workdir,
        connect_sync(db.dsn) as conn,
    ):
        members = ConsumerProcesses(
            db.dsn, group=group, topic=topic, handler=HANDLERS[handler], count=opts.consumers,
            workdir=Path(workdir), settings=settings, env=_tracing_env(tracing, sink),
        )  # fmt: skip
        with members:
            member_ids = members.wait_joined(conn)
            if opts.profile_dir:
                # One file set per drain: the modes and rounds of a run would overwrite
                # each other's under the handler's name alone.
                mode = "" if tracing is None else f"-tracing-{tracing:g}"
                members.start_profilers(Path(opts.profile_dir), f"{handler}{mode}-{group}")
            if opts.statement_stats:
                conn.execute("SELECT pg_stat_statements_reset()")
            meter = CpuMeter(
                [p.pid for p in members.procs],
                postmaster_pid(db.throwaway.pgdata) if db.throwaway else None,
            )
            cpu_start = meter.sample()
            partitions = list(range(opts.partitions))
            with conn.transaction():
                conn.execute(COORD.assign, {
                    "group": group, "topic": topic, "partitions": partitions,
                    "members": [member_ids[p % len(member_ids)] for p in partitions],
                })  # fmt: skip
                conn.execute(COORD.notify_group, {"group": group})
            started = time.perf_counter()
            wall_started = time.time()
            left = _wait_empty(conn, topic, group, started + opts.timeout, opts.poll_interval)
            elapsed = time.perf_counter() - started
            cpu = CpuMeter.report(cpu_start, meter.sample(), opts.messages)
            members.stop_profilers()
            if left:
                raise BenchError(
                    f"{handler}: {left} of {opts.messages} messages still unfinished after "
                    f"{opts.timeout}s (--timeout)"
                )
        reports = members.reports()
        summary = _summarise(opts, elapsed, wall_started, reports)
        summary["started_at"] = round(wall_started, 3)  # when, beside the other drains
        summary["cpu"] = cpu
        summary["msgs_per_consumer_cpu_s"] = _per_consumer_cpu_s(opts.messages, cpu)
        if sink is not None:
            # The consumers flushed their last metrics and spans when they exited.
            summary["metrics_exported"] = _metrics_exported(sink.take_metrics())
        if sink is not None and tracing is not None:
            spans = sink.take()
            summary["spans_exported"] = {
                "process": sum(n for name, n in spans.items() if name.startswith("process ")),
                "other": sum(n for name, n in spans.items()
                             if name != "requests" and not name.startswith("process ")),
                "requests": spans["requests"],
            }  # fmt: skip
        if opts.statement_stats:
            # What PostgreSQL spent its time on during this drain (and the shutdown after).
            summary["statements"] = _top_statements(conn)
    return summary


def _metrics_exported(metrics: dict[str, int]) -> dict[str, int]:
    """What the consumers' metrics counted: every message once, if recording was on."""
    return {
        "requests": metrics["requests"],
        "processed": metrics.get("pgcg.messages.processed", 0),
        "process_durations": metrics.get("messaging.process.duration", 0),
    }


def _wait_empty(conn: Any, topic: str, group: str, deadline: float, interval: float) -> int:
    """Poll what `group` has not finished until nothing is left.

    The poll reads the group's completion rows, not the log (bench/database.py
    unfinished), on the same CPUs as the consumers, so polls follow the observed rate:
    wait half the time the rate says is left (at most 2 s; 0.2 s until the rate is known),
    down to `interval` near the end. Finishing earlier than predicted needs the rate to
    double, so the end is seen within `interval` in practice; a few dozen polls per run.
    """
    previous: tuple[float, int] | None = None
    while True:
        now = time.perf_counter()
        left = unfinished(conn, topic).get(group, 0)
        if left == 0 or now > deadline:
            return left
        wait = max(interval, 0.2)
        if previous is not None and previous[1] > left:
            rate = (previous[1] - left) / (now - previous[0])
            wait = min(max(left / rate / 2, interval), 2.0)
        previous = (now, left)
        time.sleep(wait)


def _summarise(
    opts: DrainOptions, elapsed: float, wall_started: float, reports: list[dict[str, Any]]
) -> dict[str, Any]:
    seen: dict[str, int] = {}
    for report in reports:
        for key in report["keys"]:
            seen[key] = seen.get(key, 0) + 1
    handled = sum(r["handled"] for r in reports)
    last_at = max((r["last_at"] for r in reports), default=wall_started)
    first_at = min((r["first_at"] for r in reports if r["first_at"]), default=wall_started)
    return {
        "messages": opts.messages,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(opts.messages / elapsed),
        # When the last handler finished, from the handlers' own clocks: the end-of-drain
        # poll adds up to one poll interval plus the last completion write on top of this.
        "handled_in_s": round(last_at - wall_started, 3),
        # From the first handled message to the last: without the start, and for the parked
        # handler without the failed first deliveries' backoff.
        "handling_msgs_per_s": round(handled / max(last_at - first_at, 0.001)),
        "handled": handled,
        "key_order_violations": sum(r["violations"] for r in reports),
        "duplicates": sum(r["duplicates"] for r in reports),
        "key_overlaps": sum(r["overlaps"] for r in reports),
        "keys_in_several_processes": sum(1 for n in seen.values() if n > 1),
        "processes_reporting": len(reports),
        "consumers": opts.consumers,
        "concurrency": opts.concurrency,
    }


def _top_statements(conn: Any, limit: int = 8) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms, "
        "round(mean_exec_time::numeric, 3) AS mean_ms, rows, "
        "left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query "
        "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT %s",
        (limit,),
    ).fetchall()
    return [{**r, "total_ms": float(r["total_ms"]), "mean_ms": float(r["mean_ms"])}
            for r in rows]  # fmt: skip


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    ratios = _tracing_ratios(result["pgcg"])
    if "rounds" in result:
        result["tracing_spread"] = _tracing_spread(result["rounds"])
        ratios.update((name, spread["median"]) for name, spread in result["tracing_spread"].items())
    ratios.update(_loop_ratios(result))
    ratios.update(_bound_ratios(result))
    ratios.update(_group_ratios(result))
    ratios.update(_parked_ratios(result))
    raw = result.get("raw")
    if not raw:
        return ratios
    for handler, run in result["pgcg"].items():
        if run["tracing"] != "off":
            continue
        ratios[f"drain_{handler}_vs_raw_drain"] = round(
            run["drain"]["msgs_per_s"] / raw["drain"]["msgs_per_s"], 3
        )
        ours, theirs = run["drain"].get("cpu") or {}, raw["drain"].get("cpu") or {}
        if ours.get("msgs_per_cpu_s") and theirs.get("msgs_per_cpu_s"):
            ratios[f"drain_{handler}_vs_raw_drain_per_cpu_s"] = round(
                ours["msgs_per_cpu_s"] / theirs["msgs_per_cpu_s"], 3
            )
        ratios[f"enqueue_{handler}_run_vs_raw_insert"] = round(
            run["enqueue"]["msgs_per_s"] / raw["insert"]["msgs_per_s"], 3
        )
    return ratios


def _loop_ratios(result: dict[str, Any]) -> dict[str, float]:
    """pgcg's drain against the hand-written loop with the same handler."""
    ratios = {}
    for handler, loop in (result.get("loop") or {}).items():
        run = result["pgcg"].get(handler)
        if run is None:
            continue
        ratios[f"drain_{handler}_vs_loop_drain"] = round(
            run["drain"]["msgs_per_s"] / loop["drain"]["msgs_per_s"], 3
        )
        ours, theirs = run["drain"].get("cpu") or {}, loop["drain"].get("cpu") or {}
        if ours.get("msgs_per_cpu_s") and theirs.get("msgs_per_cpu_s"):
            ratios[f"drain_{handler}_vs_loop_drain_per_cpu_s"] = round(
                ours["msgs_per_cpu_s"] / theirs["msgs_per_cpu_s"], 3
            )
    return ratios


def _group_ratios(result: dict[str, Any]) -> dict[str, float]:
    """Each group of a G-group drain against the one-group drain of the same handler, in
    the same run: throughput, and messages per CPU-second of its consumers."""
    ratios = {}
    for handler, run in (result.get("groups") or {}).items():
        one = result["pgcg"].get(handler)
        if one is None:
            continue
        for n, drained in enumerate(run["by_group"].values()):
            label = f"{handler}_{run['groups']}_groups_g{n}"
            ratios[f"drain_{label}_vs_one_group"] = round(
                drained["msgs_per_s"] / one["drain"]["msgs_per_s"], 3
            )
            ours = drained.get("msgs_per_consumer_cpu_s")
            theirs = one["drain"].get("msgs_per_consumer_cpu_s")
            if ours and theirs:
                ratios[f"consumer_cpu_per_msg_{label}_vs_one_group"] = round(theirs / ours, 3)
    return ratios


def _parked_ratios(result: dict[str, Any]) -> dict[str, float]:
    """The drain whose keys wait in the parked queue against the same backlog read from the
    log (noop), in the same run."""
    parked, noop = result["pgcg"].get("parked"), result["pgcg"].get("noop")
    if parked is None or noop is None:
        return {}
    return {
        "drain_parked_vs_noop": round(
            parked["drain"]["msgs_per_s"] / noop["drain"]["msgs_per_s"], 3
        ),
        "handling_parked_vs_noop": round(
            parked["drain"]["handling_msgs_per_s"] / noop["drain"]["handling_msgs_per_s"], 3
        ),
    }


def _bound_ratios(result: dict[str, Any]) -> dict[str, float]:
    """The 1 ms handler's drain against what its concurrency allows at most: every
    consumer process running `concurrency` handlers at once, each taking 1 ms."""
    run = result["pgcg"].get("sleep1ms")
    if run is None:
        return {}
    drain = run["drain"]
    bound = drain["consumers"] * drain["concurrency"] * 1000
    return {"drain_sleep1ms_vs_concurrency_bound": round(drain["msgs_per_s"] / bound, 3)}


def _tracing_spread(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each traced mode against the off drain of its own round (they ran back to back),
    over the rounds: the median, and the spread from the lowest to the highest."""
    by_name: dict[str, list[float]] = {}
    for round_ in rounds:
        for name, value in _tracing_ratios(round_).items():
            by_name.setdefault(name, []).append(value)
    return {
        name: {
            "median": round(statistics.median(values), 3),
            "min": min(values),
            "max": max(values),
            "rounds": values,
        }
        for name, values in by_name.items()
    }


def _cross_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each pgcg drain (tracing off) against the same handler's at another backlog size on
    the same server (`<big>_vs_<small>`, every larger size against every smaller one), and
    on another server at the same size (`pg15_vs_pg18`, in the order given): throughput,
    and messages per CPU-second of the consumers and the server. With both several sizes
    and several servers, the size or server held fixed is part of the name."""
    servers = list(dict.fromkeys(r["label"]["server"] for r in runs))
    sizes = list(dict.fromkeys(r["label"]["messages"] for r in runs))
    by = {(r["label"]["server"], r["label"]["messages"]): r for r in runs}
    ratios: dict[str, float] = {}
    for server in servers:
        tag = f"_{server}" if len(servers) > 1 else ""
        for small in sizes:
            for big in (n for n in sizes if n > small):
                _compare(ratios, by[server, big], by[server, small], tag, f"{big}_vs_{small}")
    for size in sizes:
        tag = f"_{size}" if len(sizes) > 1 else ""
        for n, first in enumerate(servers):
            for second in servers[n + 1 :]:
                _compare(ratios, by[first, size], by[second, size], tag, f"{first}_vs_{second}")
    return ratios


def _compare(
    ratios: dict[str, float], ours: dict[str, Any], theirs: dict[str, Any], tag: str, versus: str
) -> None:
    for handler, run in ours["pgcg"].items():
        other = theirs["pgcg"].get(handler)
        if run["tracing"] != "off" or other is None:
            continue
        ratios[f"drain_{handler}{tag}_{versus}"] = round(
            run["drain"]["msgs_per_s"] / other["drain"]["msgs_per_s"], 3
        )
        mine = (run["drain"].get("cpu") or {}).get("msgs_per_cpu_s")
        yours = (other["drain"].get("cpu") or {}).get("msgs_per_cpu_s")
        if mine and yours:
            ratios[f"drain_{handler}{tag}_per_cpu_s_{versus}"] = round(mine / yours, 3)


def _tracing_ratios(runs: dict[str, Any]) -> dict[str, float]:
    """Each traced drain against the same handler's untraced one, in the same run:
    throughput, and the consumer processes' CPU time per message."""
    ratios = {}
    for run in runs.values():
        off = runs.get(run["handler"])
        if run["tracing"] == "off" or off is None:
            continue
        label = f"{run['handler']}_tracing_{run['tracing']}"
        ratios[f"drain_{label}_vs_off"] = round(
            run["drain"]["msgs_per_s"] / off["drain"]["msgs_per_s"], 3
        )
        ours, theirs = run["drain"].get("cpu") or {}, off["drain"].get("cpu") or {}
        if ours.get("consumers_s") and theirs.get("consumers_s"):
            ratios[f"consumer_cpu_per_msg_{label}_vs_off"] = round(
                ours["consumers_s"] / theirs["consumers_s"], 3
            )
    return ratios


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = result["pgcg"]
    if "noop" in runs:
        got = runs["noop"]["drain"]["msgs_per_s"]
        want = TARGETS["drain_noop_msgs_per_s"]
        out["drain_noop"] = {"target": want, "measured": got, "met": got >= want}
    if runs:
        got = max(r["enqueue"]["msgs_per_s"] for r in runs.values())
        want = TARGETS["enqueue_msgs_per_s"]
        out["enqueue"] = {"target": want, "measured": got, "met": got >= want}
    every_run = [r for round_ in result.get("rounds") or [runs] for r in round_.values()]
    out["key_order_violations"] = sum(r["drain"]["key_order_violations"] for r in every_run) + sum(
        d["key_order_violations"]
        for g in (result.get("groups") or {}).values()
        for d in g["by_group"].values()
    )
    return out
