"""The faults a chaos run injects: a seed-driven schedule (pure), and the code that applies
each fault to a running cluster and heals it.

The schedule is a list of faults in rounds; each round is a shuffled permutation of every
enabled kind, so any run longer than one round has exercised them all. Everything random
(order, how long each fault holds, which victim, which variant, the gap before the next)
comes from the seed. Which process a victim index names depends on who is alive at that
moment, so two runs of one seed inject the same faults in the same order at nearly the
same times; that is as reproducible as real processes allow.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgcg.bench.chaos.journal import Disruption
from pgcg.bench.chaos.kernelhole import KernelHoles, clients_of
from pgcg.bench.chaos.netproxy import NetProxy
from pgcg.bench.cluster import Cluster, Proc
from pgcg.bench.throwaway import ThrowawayPostgres

log = logging.getLogger("pgcg.nemesis")

FAULT_KINDS = (
    "consumer-kill",  # SIGKILL a consumer; a replacement joins after `hold`
    "consumer-pause",  # SIGSTOP a consumer past its session timeout, then SIGCONT
    "leader-kill",  # SIGKILL the leading coordinator; a replacement starts after `hold`
    "leader-pause",  # SIGSTOP the leading coordinator past the leader timeout, then SIGCONT
    "net-cut",  # reset a consumer's connections and refuse new ones for `hold`
    "net-stall",  # hold every byte between a consumer and PostgreSQL for `hold`
    "pg-restart-fast",  # pg_ctl restart -m fast
    "pg-restart-immediate",  # pg_ctl restart -m immediate (a crash, then recovery)
    "member-join",  # a new consumer joins one of the groups
    "member-leave",  # a consumer leaves gracefully (SIGTERM: drain, release, leave)
    "net-blackhole",  # drop every byte to and from a consumer, no reset, past its session
    "assignment-lock",  # a session holds a group's assignment rows FOR UPDATE for `hold`
    "revoke-cancel",  # a consumer joins and leaves at once: a revocation issued, called off
    "clock-step",  # step the database server's wall clock by `step` for `hold`, then back
)
# Kinds a run injects only when named in --faults (not in `all`): they need what not every
# machine gives (root, a private network namespace), and would change every seed's plan.
OPT_IN_KINDS = (
    # the kernel drops every packet to and from a consumer for `hold` (no ACK, no
    # keepalive answer, no RST); then new connections pass, the old ones stay dead
    "net-blackhole-kernel",
)
ALL_KINDS = FAULT_KINDS + OPT_IN_KINDS
SERVER_FAULTS = frozenset({"pg-restart-fast", "pg-restart-immediate"})
# Needs our own server, started with a steppable clock (libfaketime).
CLOCK_FAULTS = frozenset({"clock-step"})


@dataclass(frozen=True)
class Fault:
    kind: str
    hold: float  # seconds the fault lasts before it is healed
    gap: float  # seconds of calm after it is healed
    victim: int  # index into the candidates sorted by name, modulo their number
    # pauses: timed | handoff (resumed the moment its partitions or leadership moved on)
    # | lease (consumers: past the lease, within the session); net-cut: one | all
    # (consumers); net-stall: one | all | handoff (one, healed the moment its partitions
    # moved on) | lease (one, past the lease, within the session); net-blackhole: one | all;
    # assignment-lock: some | all | join; revoke-cancel: joined | revoking; clock-step:
    # forward | backward | revoking (forward, the moment a revocation is in progress, with
    # the draining owner's network stalled meanwhile); else: -
    variant: str
    step: float = 0.0  # clock-step: seconds the database's clock moves (back: negative)

    def describe(self) -> str:
        variant = "" if self.variant == "-" else f"/{self.variant}"
        step = f" step={self.step:+.1f}s" if self.step else ""
        return (
            f"{self.kind}{variant}{step} hold={self.hold:.1f}s gap={self.gap:.1f}s v={self.victim}"
        )


def schedule(
    seed: int,
    kinds: Sequence[str],
    *,
    session_timeout: float,
    leader_timeout: float,
    lease_margin: float | None = None,
) -> Iterator[Fault]:
    """Endless rounds, each a shuffled permutation of `kinds`; every parameter drawn from
    `seed`, so one seed always yields the same faults in the same order.

    `lease_margin` (default: what Settings derives from the session timeout) sizes the
    `lease` variants: a consumer frozen or cut off past its lease but not its session
    fences itself, then gets its partitions back under the same epoch."""
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
    if not kinds:
        return
    margin = max(1.0, session_timeout * 0.2) if lease_margin is None else lease_margin
    rng = random.Random(seed)

    def past_lease() -> float:
        return session_timeout - margin + rng.uniform(0.1, 0.9) * margin

    while True:
        order = list(kinds)
        rng.shuffle(order)
        for kind in order:
            variant, step = "-", 0.0
            if kind == "consumer-pause":
                variant = rng.choice(["timed", "handoff", "lease"])
                hold = past_lease() if variant == "lease" else session_timeout + rng.uniform(0.5, 3)
            elif kind == "leader-pause":
                variant = rng.choice(["timed", "handoff"])
                hold = leader_timeout + rng.uniform(0.5, 3.0)
            elif kind == "net-cut":
                variant = "all" if rng.random() < 0.25 else "one"
                hold = rng.uniform(0.3, session_timeout + 2.0)
            elif kind == "net-stall":
                variant = rng.choice(["one", "handoff", "handoff", "lease", "all"])
                hold = past_lease() if variant == "lease" else rng.uniform(0.3, session_timeout + 2)
            elif kind in ("net-blackhole", "net-blackhole-kernel"):
                # Past the session timeout: the member must notice the silence, fence itself
                # and rejoin on a new connection once the link is back.
                variant = "all" if rng.random() < 0.2 else "one"
                hold = session_timeout + rng.uniform(0.5, 3.0)
            elif kind == "assignment-lock":
                # some: a few partitions' rows; all: every row of the group; join: every
                # row, while a consumer joins, so the rebalance it causes waits on them.
                variant = rng.choice(["some", "all", "join"])
                hold = rng.uniform(0.5, session_timeout + 2.0)
            elif kind == "revoke-cancel":
                # joined: it leaves the moment it has joined; revoking: the moment a
                # revocation in its favour was issued (the leader then calls it off).
                variant = rng.choice(["joined", "revoking", "revoking"])
                hold = 0.0
            elif kind == "clock-step":
                # Forward past the drain deadline (not shorter than the session timeout)
                # and the leader timeout, so a revoke_deadline or a leader's heartbeat read
                # on the database's clock alone is overdue at once; back as far.
                variant = rng.choice(["forward", "backward", "revoking"])
                step = rng.uniform(session_timeout + 1.0, 3 * session_timeout)
                step = -step if variant == "backward" else step
                # revoking: the draining owner's network stalls as long, past its lease.
                hold = past_lease() + 1.0 if variant == "revoking" else rng.uniform(0.5, 5.0)
            elif kind in ("consumer-kill", "leader-kill"):
                hold = rng.uniform(0.5, 4.0)
            else:
                hold = 0.0
            gap = rng.uniform(1.0, 3.0)
            yield Fault(
                kind, round(hold, 2), round(gap, 2), rng.randrange(1 << 16), variant,
                round(step, 2),
            )  # fmt: skip


@dataclass
class Executed:
    fault: Fault
    start: datetime
    end: datetime | None = None
    victims: list[str] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.fault.kind,
            "variant": self.fault.variant,
            "hold": self.fault.hold,
            "step": self.fault.step,
            "victims": self.victims,
            "start": self.start.isoformat(),
            "end": self.end.isoformat() if self.end else None,
            "note": self.note,
        }


def _now() -> datetime:
    return datetime.now(UTC)


class Nemesis:
    """Applies faults to one cluster, one at a time, and records what it did.

    The cluster's consumers may belong to several groups of one topic (`group_of`, kept up
    to date by `spawn_consumer`); `strength` is how many consumers each group runs with.
    Consumer faults hit any of them; a replacement joins the victim's group; leader
    faults hit the coordinator leading `group`, the first of `strength`."""

    def __init__(
        self,
        *,
        cluster: Cluster,
        dsn: str,
        strength: dict[str, int],
        group_of: dict[Proc, str],
        proxies: dict[Proc, NetProxy],
        server: ThrowawayPostgres | None,
        spawn_consumer: Callable[[str], Proc],
        spawn_coordinator: Callable[[], Proc],
        session_timeout: float,
        leader_timeout: float,
        holes: KernelHoles | None = None,
        recovery_bound: float = 0.0,
    ) -> None:
        self.cluster = cluster
        self.dsn = dsn
        self.strength = strength
        self.group = next(iter(strength))
        self.group_of = group_of
        self.proxies = proxies
        self.server = server
        self.spawn_consumer = spawn_consumer
        self.spawn_coordinator = spawn_coordinator
        self.session_timeout = session_timeout
        self.leader_timeout = leader_timeout
        # Drop rules in the run's own network namespace (None: not available here).
        self.holes = holes
        # Seconds within which a consumer cut off by a kernel black hole must heartbeat
        # and handle again once the link is back; who did not, with how long it took.
        self.recovery_bound = recovery_bound
        self.unrecovered: list[str] = []
        self.executed: list[Executed] = []
        self.disruptions: list[Disruption] = []
        # Consumers a fault killed or stopped on purpose (the others exited by themselves).
        self.ended: set[Proc] = set()

    # -- helpers ---------------------------------------------------------------------------

    def _query(self, sql: str, params: Any = None, timeout: float = 30.0) -> list[dict[str, Any]]:
        """A query on a fresh direct connection, retried while the server restarts."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=5
                ) as conn:
                    return conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _consumers(self) -> list[Proc]:
        return sorted(
            (p for p in self.cluster.live("consumer") if not p.paused), key=lambda p: p.name
        )

    def _pick(self, fault: Fault) -> Proc | None:
        candidates = self._consumers()
        return candidates[fault.victim % len(candidates)] if candidates else None

    def _leader(self, wait: float = 15.0) -> tuple[Proc | None, int]:
        deadline = time.monotonic() + wait
        while True:
            try:
                proc, epoch = self.cluster.leader(self.group)
            except psycopg.OperationalError:
                proc, epoch = None, 0
            if proc is not None and proc.alive and not proc.paused:
                return proc, epoch
            if time.monotonic() > deadline:
                return None, 0
            time.sleep(0.1)

    def _members(self, group: str) -> list[Proc]:
        return [p for p in self._consumers() if self.group_of.get(p) == group]

    def _owned_by(self, proc: Proc) -> dict[int, int]:
        """partition -> epoch of what the consumer process owns right now, in its group."""
        rows = self._query(
            "SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments pa "
            "JOIN pgcg.consumer_groups cg USING (group_name, member_id) "
            "WHERE pa.group_name = %s AND cg.pid = %s",
            (self.group_of[proc], proc.pid),
        )
        return {r["partition"]: r["epoch"] for r in rows}

    def _moved(self, proc: Proc, owned: dict[int, int]) -> bool:
        rows = self._query(
            "SELECT partition, epoch FROM pgcg.partition_assignments "
            "WHERE group_name = %s AND partition = ANY(%s)",
            (self.group_of[proc], list(owned)),
        )
        return any(r["epoch"] != owned[r["partition"]] for r in rows)

    def _hit(self, kind: str, proc: Proc | None, start: datetime, end: datetime | None) -> None:
        self.disruptions.append(Disruption(kind, start, end, proc.pid if proc else None))

    # -- faults ----------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Executed:
        record = Executed(fault, _now())
        self.executed.append(record)
        log.info("fault %s", fault.describe(), extra={"action": "fault_start"})
        getattr(self, "_" + fault.kind.replace("-", "_"))(fault, record)
        record.end = record.end or _now()
        log.info(
            "fault %s done: %s %s",
            fault.kind,
            ",".join(record.victims) or "-",
            record.note,
            extra={"action": "fault_end"},
        )
        return record

    def _consumer_kill(self, fault: Fault, record: Executed) -> None:
        victim = self._pick(fault)
        if victim is None:
            record.note = "skipped: no consumer"
            return
        record.victims.append(victim.name)
        self.ended.add(victim)
        victim.kill()
        self._hit(fault.kind, victim, record.start, None)
        time.sleep(fault.hold)
        replacement = self.spawn_consumer(self.group_of[victim])
        record.note = f"replaced by {replacement.name}"

    def _consumer_pause(self, fault: Fault, record: Executed) -> None:
        victim = self._pick(fault)
        if victim is None:
            record.note = "skipped: no consumer"
            return
        record.victims.append(victim.name)
        owned = self._owned_by(victim) if fault.variant == "handoff" else {}
        victim.pause()
        started = time.monotonic()
        if owned:
            # Resume the moment its partitions have moved on: its in-flight work and
            # pending acks then race the new owner, which only the fence stops.
            cap = self.session_timeout + 8.0
            while not self._moved(victim, owned) and time.monotonic() - started < cap:
                time.sleep(0.02)
            record.note = f"resumed after hand-off ({time.monotonic() - started:.1f}s)"
        else:
            time.sleep(fault.hold)
            record.note = f"resumed after {fault.hold:.1f}s"
        victim.resume()
        self._hit(fault.kind, victim, record.start, _now())

    def _leader_kill(self, fault: Fault, record: Executed) -> None:
        leader, _ = self._leader()
        if leader is None:
            record.note = "skipped: no leader"
            return
        record.victims.append(leader.name)
        leader.kill()
        self._hit(fault.kind, leader, record.start, None)
        time.sleep(fault.hold)
        replacement = self.spawn_coordinator()
        record.note = f"replaced by {replacement.name}"

    def _leader_pause(self, fault: Fault, record: Executed) -> None:
        leader, epoch = self._leader()
        if leader is None:
            record.note = "skipped: no leader"
            return
        record.victims.append(leader.name)
        leader.pause()
        started = time.monotonic()
        if fault.variant == "handoff":
            cap = self.leader_timeout + 10.0
            while time.monotonic() - started < cap:
                rows = self._query(
                    "SELECT leader_epoch FROM pgcg.coordinator_leader WHERE scope = %s",
                    (self.group,),
                )
                if rows and rows[0]["leader_epoch"] > epoch:
                    break
                time.sleep(0.02)
            record.note = f"resumed after takeover ({time.monotonic() - started:.1f}s)"
        else:
            time.sleep(fault.hold)
            record.note = f"resumed after {fault.hold:.1f}s"
        leader.resume()
        self._hit(fault.kind, leader, record.start, _now())

    def _network_victims(self, fault: Fault) -> list[Proc]:
        if fault.variant == "all":
            return [p for p in self._consumers() if p in self.proxies]
        victim = self._pick(fault)
        return [victim] if victim is not None and victim in self.proxies else []

    def _net_cut(self, fault: Fault, record: Executed) -> None:
        victims = self._network_victims(fault)
        for proc in victims:
            record.victims.append(proc.name)
            self.proxies[proc].cut(refuse_for=fault.hold)
        time.sleep(fault.hold)
        end = _now()
        for proc in victims:
            self._hit(fault.kind, proc, record.start, end)

    def _net_stall(self, fault: Fault, record: Executed) -> None:
        victims = self._network_victims(fault)
        owned = self._owned_by(victims[0]) if victims and fault.variant == "handoff" else {}
        if owned:
            # Held until its partitions have moved on, then released at once: the
            # statements it sent meanwhile (acks among them) reach the server just after
            # the hand-off, which only the fence stops.
            proxy = self.proxies[victims[0]]
            record.victims.append(victims[0].name)
            proxy.stall(self.session_timeout + 30.0)
            started = time.monotonic()
            cap = self.session_timeout + 8
            while not self._moved(victims[0], owned) and time.monotonic() - started < cap:
                time.sleep(0.02)
            proxy.heal()
            record.note = f"released after hand-off ({time.monotonic() - started:.1f}s)"
            self._hit(fault.kind, victims[0], record.start, _now())
            return
        for proc in victims:
            record.victims.append(proc.name)
            self.proxies[proc].stall(fault.hold)
        time.sleep(fault.hold)
        end = _now()
        for proc in victims:
            self._hit(fault.kind, proc, record.start, end)

    def _restart(self, fault: Fault, record: Executed, mode: str) -> None:
        if self.server is None:
            record.note = "skipped: not our server"
            return
        started = time.monotonic()
        self.server.restart(mode)
        record.note = f"down for {time.monotonic() - started:.1f}s"
        self._hit(fault.kind, None, record.start, _now())

    def _pg_restart_fast(self, fault: Fault, record: Executed) -> None:
        self._restart(fault, record, "fast")

    def _pg_restart_immediate(self, fault: Fault, record: Executed) -> None:
        self._restart(fault, record, "immediate")

    def _member_join(self, fault: Fault, record: Executed) -> None:
        groups = list(self.strength)
        group = groups[fault.victim % len(groups)]
        live = [p for p in self.cluster.live("consumer") if self.group_of.get(p) == group]
        if len(live) >= self.strength[group] + 2:
            record.note = f"skipped: {group} at its largest"
            return
        proc = self.spawn_consumer(group)
        record.victims.append(proc.name)
        self._hit(fault.kind, proc, record.start, record.start)

    def _member_leave(self, fault: Fault, record: Executed) -> None:
        victim = self._pick(fault)
        if victim is None:
            record.note = "skipped: no consumer"
            return
        group = self.group_of[victim]
        if len(self._members(group)) <= max(1, self.strength[group] // 2):
            record.note = f"skipped: {group} at its smallest"
            return
        record.victims.append(victim.name)
        self.ended.add(victim)
        victim.terminate()
        self._hit(fault.kind, victim, record.start, record.start)

    def _net_blackhole(self, fault: Fault, record: Executed) -> None:
        victims = self._network_victims(fault)
        for proc in victims:
            record.victims.append(proc.name)
            self.proxies[proc].blackhole(fault.hold)
        time.sleep(fault.hold)
        end = _now()
        for proc in victims:
            self._hit(fault.kind, proc, record.start, end)

    def _net_blackhole_kernel(self, fault: Fault, record: Executed) -> None:
        """The kernel drops every packet to and from the victims' proxies for `hold`: no
        ACK, no keepalive answer, no RST, new connections unanswered. Then the link is back
        for new connections, but every connection open then stays dead for good, as when
        the host it reached is gone (a failover to another host under the same address):
        its client learns of it only by its own timeouts. The proxy drops its side and
        the server's sessions (the server's own view of a vanished peer, sooner)."""
        victims = self._network_victims(fault)
        if self.holes is None:
            record.note = "skipped: no private network namespace"
            return
        rules: list[int] = []
        for proc in victims:
            record.victims.append(proc.name)
            rules += self.holes.drop_port(self.proxies[proc].port)
        time.sleep(fault.hold)
        dead = 0
        for proc in victims:
            proxy = self.proxies[proc]
            for client_port in clients_of(proxy.port):
                self.holes.drop_flow(client_port, proxy.port)
                dead += 1
            proxy.cut()  # its resets are dropped with the rest of those flows
        self.holes.lift(rules)
        back = _now()
        record.note = f"{dead} connection(s) left dead; " + self._await_recovery(victims, back)
        for proc in victims:
            self._hit(fault.kind, proc, record.start, _now())

    def _await_recovery(self, victims: list[Proc], back: datetime) -> str:
        """Wait until every victim heartbeats as a member and journals a handling started
        after `back`, for at most the recovery bound; a victim that did not is recorded.
        One that exited meanwhile is the supervisor's to replace, and counts as back."""
        assert self.holes is not None
        started = time.monotonic()
        waiting = {p: (False, False) for p in victims}
        took: list[float] = []
        while waiting and time.monotonic() - started < self.recovery_bound:
            self.holes.reap()
            for proc in list(waiting):
                if not proc.alive:
                    del waiting[proc]
                    continue
                rows = self._query(
                    "SELECT EXISTS (SELECT FROM pgcg.consumer_groups WHERE pid = %(pid)s "
                    "AND last_heartbeat >= %(back)s) AS member, EXISTS (SELECT FROM "
                    "public.pgcg_journal WHERE pid = %(pid)s AND started_at >= %(back)s) "
                    "AS handling",
                    {"pid": proc.pid, "back": back},
                )
                seen = (rows[0]["member"], rows[0]["handling"])
                if all(seen):
                    del waiting[proc]
                    took.append(time.monotonic() - started)
                else:
                    waiting[proc] = seen
            time.sleep(0.1)
        for proc, (member, handling) in waiting.items():
            self.unrecovered.append(
                f"{proc.name} (pid {proc.pid}) not back {self.recovery_bound:g}s after its "
                f"link returned at {back:%T}: "
                + ("heartbeating" if member else "no heartbeat")
                + (", handling" if handling else ", no handling")
            )
        if waiting:
            return f"NOT back within {self.recovery_bound:g}s: " + ",".join(p.name for p in waiting)
        return f"back within {max(took, default=0.0):.1f}s"

    def _assignment_lock(self, fault: Fault, record: Executed) -> None:
        groups = list(self.strength)
        group = groups[fault.victim % len(groups)]
        rows = self._query(
            "SELECT partition FROM pgcg.partition_assignments WHERE group_name = %s "
            "ORDER BY partition",
            (group,),
        )
        partitions = [r["partition"] for r in rows]
        if fault.variant == "some" and partitions:
            rng = random.Random(fault.victim)
            partitions = sorted(rng.sample(partitions, max(1, len(partitions) // 4)))
        record.victims.append(f"{group}:{len(partitions)} rows")
        try:
            with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                # The rows in one statement, as the rebalance locks them: no deadlock with
                # it, only a wait.
                conn.execute(
                    "SELECT partition FROM pgcg.partition_assignments "
                    "WHERE group_name = %s AND partition = ANY(%s) ORDER BY partition FOR UPDATE",
                    (group, partitions),
                )
                locked = time.monotonic()
                if fault.variant == "join":
                    joiner = self.spawn_consumer(group)
                    record.victims.append(joiner.name)
                    self._hit("member-join", joiner, record.start, record.start)
                time.sleep(max(0.0, fault.hold - (time.monotonic() - locked)))
                conn.commit()
        except psycopg.OperationalError as exc:  # a server restart meanwhile
            record.note = f"lock lost: {exc}".splitlines()[0]
            return
        record.note = f"held {fault.hold:.1f}s"

    def _revoke_cancel(self, fault: Fault, record: Executed) -> None:
        groups = list(self.strength)
        group = groups[fault.victim % len(groups)]
        joiner = self.spawn_consumer(group)
        record.victims.append(joiner.name)
        self.ended.add(joiner)
        started = time.monotonic()
        # A process starting on a loaded host can take many seconds to join.
        cap = self.session_timeout + 30.0
        member: str | None = None
        while time.monotonic() - started < cap and joiner.alive:
            rows = self._query(
                "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s AND pid = %s",
                (group, joiner.pid),
            )
            member = rows[0]["member_id"] if rows else None
            if member is not None and fault.variant == "joined":
                break
            if member is not None and self._query(
                "SELECT 1 FROM pgcg.partition_assignments WHERE group_name = %s "
                "AND state = 'revoking' AND target_member_id = %s LIMIT 1",
                (group, member),
            ):
                break
            time.sleep(0.01)
        joiner.terminate()
        self._hit("member-join", joiner, record.start, _now())
        record.note = f"left {time.monotonic() - started:.2f}s after starting" + (
            "" if member else " (before it joined)"
        )

    def _clock_step(self, fault: Fault, record: Executed) -> None:
        if self.server is None or self.server.faketime is None:
            record.note = "skipped: no steppable clock"
            return
        waited, stalled = "", []
        if fault.variant == "revoking":
            waited, stalled = self._await_revocation(fault, record)
        self.server.step_clock(fault.step)
        stepped = _now()
        try:
            time.sleep(fault.hold)
        finally:
            self.server.step_clock(0.0)
            for proc in stalled:
                self.proxies[proc].heal()
        end = _now()
        record.note = f"stepped {fault.step:+.1f}s for {fault.hold:.1f}s" + waited
        self._hit(fault.kind, None, stepped, end)
        for proc in stalled:
            self._hit("net-stall", proc, stepped, end)

    def _await_revocation(self, fault: Fault, record: Executed) -> tuple[str, list[Proc]]:
        """For a step while owners drain: a consumer joins a group (one leaves first if it
        is at its largest) to cause revocations; wait for one, and stall the network of
        every owner draining then for the step (they hear of nothing until their leases run
        out, as on a slow network), so that only the leader's reading of the drain deadline
        stands between the step and a hand-off onto an owner still at work."""
        groups = list(self.strength)
        group = groups[fault.victim % len(groups)]
        members = self._members(group)
        if len(members) >= self.strength[group] + 2:
            # At its largest: one leaves first (gracefully), so the group stays in size.
            leaver = members[fault.victim % len(members)]
            record.victims.append(leaver.name)
            self.ended.add(leaver)
            leaver.terminate()
            self._hit("member-leave", leaver, record.start, record.start)
        joiner = self.spawn_consumer(group)
        record.victims.append(joiner.name)
        self._hit("member-join", joiner, record.start, record.start)
        started = time.monotonic()
        # A process starting on a loaded host can take many seconds to join.
        cap = self.session_timeout + 20.0
        rows: list[dict[str, Any]] = []
        while time.monotonic() - started < cap and not rows:
            rows = self._query(
                "SELECT DISTINCT cg.pid FROM pgcg.partition_assignments AS pa "
                "JOIN pgcg.consumer_groups AS cg USING (group_name, member_id) "
                "WHERE pa.state = 'revoking'"
            )
            if not rows:
                time.sleep(0.01)
        waited = f" after {time.monotonic() - started:.1f}s waiting for a revocation"
        pids = {r["pid"] for r in rows}
        owners = [p for p in self._consumers() if p.pid in pids and p in self.proxies]
        for proc in owners:
            record.victims.append(proc.name)
            self.proxies[proc].stall(fault.hold + 30.0)
        return waited + (f", {len(owners)} owner(s) stalled" if owners else ""), owners

    # -- healing ---------------------------------------------------------------------------

    def heal(self, coordinators: int) -> None:
        """Undo whatever is still in effect and bring every group back to strength."""
        if self.server is not None and self.server.faketime is not None:
            self.server.step_clock(0.0)
        for proc in self.cluster.procs:
            if proc.paused:
                proc.resume()
        for proxy in self.proxies.values():
            proxy.heal()
        if self.holes is not None:
            self.holes.reap(everything=True)
        while len(self.cluster.live("coordinator")) < coordinators:
            self.spawn_coordinator()
        for group, n in self.strength.items():
            live = [p for p in self.cluster.live("consumer") if self.group_of.get(p) == group]
            for _ in range(n - len(live)):
                self.spawn_consumer(group)
