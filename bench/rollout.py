"""Replay a Deployment's rolling update of one consumer group with real processes.

There is no cluster here, so this plays the Deployment controller itself, by its rules
for a RollingUpdate (pkg/controller/deployment/rolling.go): scale the new ReplicaSet up
while old + new pods stay within replicas + maxSurge (a terminating pod no longer counts),
and stop old pods while the available ones stay at replicas - maxUnavailable or more. A
pod is available once it has been ready for minReadySeconds. Starting a pod is starting a
`pgcg consumer` process with its own /readyz port; stopping one is SIGTERM, then SIGKILL
after its grace period.

While it runs, a sampler reads the group's assignments every few milliseconds and reports
what the rollout cost the group:
  moves            ownership changes (epoch increments) over the rollout
  rebalances       rebalances the leader recorded
  max_unowned_s    longest time any partition had no working owner: unassigned, or its
                   owner was stopping (SIGTERM sent), or it was being handed over
                   (revoking); nobody takes new messages of it then
  max_unowned      most partitions without a working owner at one moment
  short_at_stop    at each SIGTERM of an old pod: available new pods holding less than
                   their share (partitions / live members); with a readiness that means
                   "holds its assignment" it stays 0
  beyond_draining  most partitions at one moment without a working owner that were not
                   the stopping pods' own, while a stopping pod was still in the group:
                   hand-offs to new pods overlapping a drain
  forced, lost     forced hand-offs (a drain deadline ran out), `partition_lost` log lines

    python -m pgcg.bench.rollout                      # both strategies, fast timeouts
    python -m pgcg.bench.rollout --strategy chart --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

from pgcg.bench.cluster import Cluster, Proc
from pgcg.consumer.message import Message
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync

HANDLER = "pgcg.bench.rollout:handle"
# Short timeouts, so a rollout takes seconds (the chart's defaults are 2/10/10/10).
FAST = {"heartbeatInterval": 0.5, "sessionTimeout": 3.0, "drainDeadline": 2.0, "leaderTimeout": 3}
WORK_S = 0.02  # per message: handlers are in flight when a partition moves


async def handle(message: Message) -> None:
    await anyio.sleep(WORK_S)


@dataclass(frozen=True)
class Strategy:
    """A Deployment's rollingUpdate, and what its pods' readiness means."""

    name: str
    max_surge: int | str
    max_unavailable: int | str
    min_ready_seconds: float
    # "holds": /readyz as pgcg serves it (holds its assignment). "joined": ready as soon
    # as it joined the group with a valid lease, what /readyz meant before.
    readiness: str
    # The readinessProbe: probed every period; ready on one success, not ready after
    # failure_threshold failures in a row (a blip shorter than that changes nothing).
    probe_period: float = 2.0
    failure_threshold: int = 3

    def resolve(self, replicas: int) -> tuple[int, int]:
        """maxSurge rounds up, maxUnavailable down, as the controller does."""

        def value(v: int | str, up: bool) -> int:
            if isinstance(v, int):
                return v
            fraction = int(v.rstrip("%")) * replicas / 100
            return math.ceil(fraction) if up else math.floor(fraction)

        surge, unavailable = value(self.max_surge, True), value(self.max_unavailable, False)
        if surge == 0 and unavailable == 0:
            unavailable = 1  # the controller's rule: both 0 would never progress
        return surge, unavailable


def chart_strategy(session_timeout: float) -> Strategy:
    """What helm/pgcg renders (tests/test_helm.py checks the two agree)."""
    return Strategy("chart", 1, 0, math.ceil(session_timeout), "holds", 2.0, 3)


# Kubernetes' default rollingUpdate with the chart as it was: readiness on joining, a
# probe every 5 s, no minReadySeconds.
KUBERNETES_DEFAULT = Strategy("25%/25%", "25%", "25%", 0, "joined", 5.0, 3)


@dataclass(eq=False)
class Pod:
    proc: Proc
    port: int
    generation: str  # old | new
    started: float
    ready_since: float | None = None
    stopped_at: float | None = None  # SIGTERM sent
    member_id: str | None = None
    probed_at: float = 0.0
    failures: int = 0

    @property
    def stopping(self) -> bool:
        return self.stopped_at is not None


@dataclass
class Report:
    strategy: str
    replicas: int
    partitions: int
    duration_s: float = 0.0
    moves: int = 0
    rebalances: int = 0
    max_unowned_s: float = 0.0
    max_unowned: int = 0
    short_at_stop: list[int] = field(default_factory=list)
    beyond_draining: int = 0
    forced: int = 0
    lost: int = 0
    stops: int = 0
    samples: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def is_ready(pod: Pod, readiness: str) -> bool:
    status, body = readyz(pod.port)
    if readiness == "holds":
        return status == 200
    # Joined with a valid lease, not stopping: the detail of every answer past those checks.
    return "lease valid for" in body


class Sampler:
    """Reads the group's assignments every `every` seconds in a thread."""

    def __init__(self, dsn: str, group: str, every: float = 0.01) -> None:
        self.dsn = dsn
        self.group = group
        self.every = every
        self.stopping_members: set[str] = set()
        # Stopping pods not yet out of the group, and what each owned when it was stopped.
        self.draining: dict[str, set[int]] = {}
        self.beyond_draining = 0
        self.live_members: set[str] = set()
        self.max_unowned = 0
        self.max_unowned_s = 0.0
        self.since: dict[int, float] = {}  # partition -> when it lost its working owner
        self.epochs: dict[int, int] = {}
        self.moves = 0
        self.samples = 0
        self.rows: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT pa.partition, pa.member_id, pa.epoch, pa.state, pa.target_member_id"
                    " FROM pgcg.partition_assignments AS pa WHERE pa.group_name = %s",
                    (self.group,),
                ).fetchall()
                members = {
                    r["member_id"]
                    for r in conn.execute(
                        "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s",
                        (self.group,),
                    )
                }
                self._observe(rows, members, time.monotonic())
                self._stop.wait(self.every)

    def _observe(self, rows: list[dict[str, Any]], members: set[str], now: float) -> None:
        with self.lock:
            self.samples += 1
            self.rows = rows
            self.live_members = members
            # A stopping pod drains until it has left the group (released what it held).
            for member in [m for m in self.draining if m not in members]:
                del self.draining[member]
            unowned = 0
            theirs = set().union(*self.draining.values()) if self.draining else None
            beyond = 0
            for r in rows:
                p = r["partition"]
                previous = self.epochs.get(p)
                if previous is not None and r["epoch"] > previous:
                    self.moves += r["epoch"] - previous
                self.epochs[p] = r["epoch"]
                working = (
                    r["state"] == "assigned"
                    and r["member_id"] in members
                    and r["member_id"] not in self.stopping_members
                )
                if working:
                    started = self.since.pop(p, None)
                    if started is not None:
                        self.max_unowned_s = max(self.max_unowned_s, now - started)
                else:
                    unowned += 1
                    self.since.setdefault(p, now)
                    if theirs is not None and p not in theirs:
                        beyond += 1
            self.max_unowned = max(self.max_unowned, unowned)
            self.beyond_draining = max(self.beyond_draining, beyond)

    def start_counting(self) -> None:
        with self.lock:
            self.moves = 0
            self.max_unowned = 0
            self.max_unowned_s = 0.0
            self.beyond_draining = 0
            self.since.clear()

    def finish(self, now: float) -> None:
        with self.lock:
            for started in self.since.values():
                self.max_unowned_s = max(self.max_unowned_s, now - started)

    def held_by(self) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for r in self.rows:
                if r["state"] == "assigned" and r["member_id"]:
                    out[r["member_id"]] = out.get(r["member_id"], 0) + 1
            return out


class Producer:
    """A steady trickle of messages over many keys, from a thread."""

    def __init__(self, dsn: str, topic: str, rate: float = 200.0, keys: int = 256) -> None:
        self.dsn, self.topic, self.rate, self.keys = dsn, topic, rate, keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        batch = max(1, int(self.rate / 10))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                messages = [
                    OutgoingMessage(f"k{random.randrange(self.keys)}", {"n": self.sent + i})
                    for i in range(batch)
                ]
                enqueue_many_sync(conn, self.topic, messages)
                self.sent += batch


class Rollout:
    """One group of `replicas` consumers on a topic, rolled once under a strategy."""

    def __init__(
        self,
        dsn: str,
        workdir: Path,
        strategy: Strategy,
        *,
        replicas: int = 4,
        partitions: int = 16,
        settings: dict[str, float] | None = None,
        run_id: str = "",
    ) -> None:
        self.dsn = dsn
        self.strategy = strategy
        self.replicas = replicas
        self.partitions = partitions
        self.settings = {**FAST, **(settings or {})}
        suffix = run_id or f"{os.getpid()}_{random.randrange(10**6)}"
        self.group = f"rollout-{suffix}"
        self.topic = f"rollout_{suffix}"
        # The chart's grace period: the drain deadline + 20 s.
        self.grace = math.ceil(self.settings["drainDeadline"]) + 20
        env = {f"PGCG_{_snake(k).upper()}": str(v) for k, v in self.settings.items()}
        self.cluster = Cluster(dsn, workdir, env={**env, "PGCG_PREFETCH": "100"})
        self.pods: list[Pod] = []
        self.events: list[tuple[float, str]] = []

    # -- pods ---------------------------------------------------------------------------------

    def start_pod(self, generation: str) -> Pod:
        port = free_port()
        proc = self.cluster.consumer(
            self.group,
            self.topic,
            HANDLER,
            name=f"{generation}-{len(self.pods) + 1}",
            env={"PGCG_HTTP_PORT": str(port)},
        )
        pod = Pod(proc, port, generation, time.monotonic())
        self.pods.append(pod)
        self.events.append((time.monotonic(), f"start {proc.name}"))
        return pod

    def stop_pod(self, pod: Pod, sampler: Sampler) -> None:
        pod.member_id = pod.member_id or self.cluster.member_id(pod.proc)
        if pod.member_id:
            with sampler.lock:
                sampler.stopping_members.add(pod.member_id)
                sampler.draining[pod.member_id] = {
                    r["partition"] for r in sampler.rows if r["member_id"] == pod.member_id
                }
        pod.stopped_at = time.monotonic()
        pod.proc.send(signal.SIGTERM)
        self.events.append((pod.stopped_at, f"SIGTERM {pod.proc.name}"))

    def available(self, pod: Pod, now: float) -> bool:
        return (
            not pod.stopping
            and pod.ready_since is not None
            and now - pod.ready_since >= self.strategy.min_ready_seconds
        )

    def probe(self, now: float) -> None:
        """The kubelet's readinessProbe, every probe_period per pod."""
        strategy = self.strategy
        for pod in self.pods:
            if pod.stopping or now - pod.probed_at < strategy.probe_period:
                continue
            pod.probed_at = now
            if is_ready(pod, strategy.readiness):
                pod.failures = 0
                if pod.ready_since is None:
                    pod.ready_since = now
                    self.events.append((now, f"ready {pod.proc.name}"))
            else:
                pod.failures += 1
                if pod.ready_since is not None and pod.failures >= strategy.failure_threshold:
                    pod.ready_since = None
                    self.events.append((now, f"not ready {pod.proc.name}"))

    def reap(self, now: float, sampler: Sampler) -> None:
        for pod in self.pods:
            if not pod.stopping:
                continue
            if pod.proc.alive and now - pod.stopped_at > self.grace:  # type: ignore[operator]
                pod.proc.kill()
                self.events.append((now, f"SIGKILL {pod.proc.name} (grace period over)"))
            if not pod.proc.alive and pod.member_id in sampler.draining:
                with sampler.lock:
                    sampler.draining.pop(pod.member_id, None)

    # -- the controller -----------------------------------------------------------------------

    def sync(self, sampler: Sampler, report: Report) -> None:
        now = time.monotonic()
        old = [p for p in self.pods if p.generation == "old" and not p.stopping]
        new = [p for p in self.pods if p.generation == "new" and not p.stopping]
        surge, unavailable = self.strategy.resolve(self.replicas)
        # Scale up the new ReplicaSet.
        room = min(self.replicas + surge - (len(old) + len(new)), self.replicas - len(new))
        for _ in range(max(room, 0)):
            new.append(self.start_pod("new"))
        # Scale down the old one.
        min_available = self.replicas - unavailable
        new_available = sum(self.available(p, now) for p in new)
        available = sum(self.available(p, now) for p in old) + new_available
        max_scaled_down = len(old) + len(new) - min_available - (len(new) - new_available)
        count = min(available - min_available, max_scaled_down, len(old))
        for pod in old[: max(count, 0)]:
            report.short_at_stop.append(self.short_of_share(new, now, sampler))
            self.stop_pod(pod, sampler)
            report.stops += 1

    def short_of_share(self, new: list[Pod], now: float, sampler: Sampler) -> int:
        """Available new pods holding less than partitions // live members."""
        held = sampler.held_by()
        members = max(len(sampler.live_members), 1)
        share = self.partitions // members
        short = 0
        for pod in new:
            if not self.available(pod, now):
                continue
            pod.member_id = pod.member_id or self.cluster.member_id(pod.proc)
            if held.get(pod.member_id or "", 0) < share:
                short += 1
        return short

    def done(self, now: float) -> bool:
        new = [p for p in self.pods if p.generation == "new"]
        return (
            len(new) == self.replicas
            and all(self.available(p, now) for p in new)
            and not any(p.proc.alive for p in self.pods if p.generation == "old")
        )

    # -- a run --------------------------------------------------------------------------------

    def settle(self, sampler: Sampler, timeout: float) -> None:
        """Every pod ready and the group balanced over exactly the live pods."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            self.probe(now)
            live = [p for p in self.pods if not p.stopping]
            held = sampler.held_by()
            quota = self.partitions // len(live)
            if (
                all(p.ready_since is not None for p in live)
                and sum(held.values()) == self.partitions
                and len(held) == len(live)
                and all(quota <= n <= quota + 1 for n in held.values())
            ):
                return
            time.sleep(0.05)
        raise TimeoutError(f"group {self.group} did not settle within {timeout}s")

    def run(self, timeout: float = 240.0) -> Report:
        report = Report(self.strategy.name, self.replicas, self.partitions)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pgcg.create_topic(%s, %s)", (self.topic, self.partitions))
        self.cluster.coordinator("--group", self.group, name="coordinator")
        with self.cluster, Producer(self.dsn, self.topic), Sampler(self.dsn, self.group) as s:
            for _ in range(self.replicas):
                self.start_pod("old")
            self.settle(s, 90)
            rebalances_before = self._rebalances()
            s.start_counting()
            started = time.monotonic()
            deadline = started + timeout
            while not self.done(time.monotonic()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout not done after {timeout}s: {self.events[-5:]}")
                self.probe(time.monotonic())
                self.sync(s, report)
                self.reap(time.monotonic(), s)
                time.sleep(0.05)
            finished = time.monotonic()
            s.finish(finished)
            report.duration_s = round(finished - started, 2)
            report.moves = s.moves
            report.max_unowned = s.max_unowned
            report.max_unowned_s = round(s.max_unowned_s, 2)
            report.beyond_draining = s.beyond_draining
            report.samples = s.samples
            report.rebalances = self._rebalances() - rebalances_before
            report.forced = self._forced()
        report.lost = sum(len(p.proc.actions("partition_lost")) for p in self.pods)
        return report

    def _rebalances(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pgcg.rebalances WHERE group_name = %s", (self.group,)
            ).fetchone()
        return int(row[0]) if row else 0

    def _forced(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pgcg.rebalances AS r, jsonb_array_elements(r.moves) AS m"
                " WHERE r.group_name = %s AND m ->> 'kind' = 'forced'",
                (self.group,),
            ).fetchone()
        return int(row[0]) if row else 0


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from pgcg.bench.throwaway import ThrowawayPostgres
    from pgcg.shared.migrate import migrate

    server = ThrowawayPostgres()
    server.start()
    try:
        migrate(server.url)
        yield server.url
    finally:
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("PGCG_DATABASE_URL"))
    parser.add_argument("--strategy", choices=["chart", "default", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=16)
    args = parser.parse_args(argv)
    chosen = {
        "chart": [chart_strategy(FAST["sessionTimeout"])],
        "default": [KUBERNETES_DEFAULT],
        "both": [chart_strategy(FAST["sessionTimeout"]), KUBERNETES_DEFAULT],
    }[args.strategy]
    reports: dict[str, list[Report]] = {}
    with _database(args.database_url) as dsn, tempfile.TemporaryDirectory() as tmp:
        for n in range(args.repeat):
            for strategy in chosen:
                rollout = Rollout(
                    dsn,
                    Path(tmp) / f"{strategy.name.replace('%', '').replace('/', '-')}-{n}",
                    strategy,
                    replicas=args.replicas,
                    partitions=args.partitions,
                    run_id=f"{n}_{random.randrange(10**6)}",
                )
                report = rollout.run()
                reports.setdefault(strategy.name, []).append(report)
                print(json.dumps(asdict(report)), flush=True)
    for name, runs in reports.items():
        keys = ("duration_s", "moves", "rebalances", "max_unowned_s", "max_unowned",
                "beyond_draining")  # fmt: skip
        summary = {k: statistics.median(getattr(r, k) for r in runs) for k in keys}
        summary["short_at_stop_max"] = max(max(r.short_at_stop, default=0) for r in runs)
        print(f"{name}: median of {len(runs)}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
