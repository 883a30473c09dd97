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
import os
import random
import time
import uuid
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
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.nemesis")
# A member's own statements, for a member with no process behind it (revoke-cancel-fetch).
MEMBER = Queries("consumer")
# The advisory locks a held fetch waits for (sql/queries/journal.sql, hold_fetches): with
# the rows it read, and before it reads.
FETCH_HOLD_LOCK = (1885825895, 1)
FETCH_GATE_LOCK = (1885825895, 2)

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
    # fetches held in flight while a revocation is issued and called off (see journal.sql)
    "revoke-cancel-fetch",
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
    # assignment-lock: some | all | join | rebalance (a rebalance that read a join waits on
    # a lock) | rebalance-stall (and the owners' network stalls as it is let go, past their
    # leases); revoke-cancel: joined | revoking; clock-step: forward | backward | revoking
    # (forward, the moment a revocation is in progress, with the draining owner's network
    # stalled meanwhile); else: -
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
                # row, while a consumer joins; rebalance: a rebalance that read a join
                # waits on a lock (the one the join causes runs only once the rows are
                # free, so `join` does not do it), past the drain deadline, so that a
                # deadline counted from the rebalance's start has passed when it lands.
                variant = rng.choice(["some", "all", "join", "rebalance", "rebalance-stall"])
                if variant.startswith("rebalance"):
                    hold = session_timeout + rng.uniform(0.5, 2.0)
                else:
                    hold = rng.uniform(0.5, session_timeout + 2.0)
            elif kind == "revoke-cancel":
                # joined: it leaves the moment it has joined; revoking: the moment a
                # revocation in its favour was issued (the leader then calls it off).
                variant = rng.choice(["joined", "revoking", "revoking"])
                hold = 0.0
            elif kind == "revoke-cancel-fetch":
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


def _one(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    """The first column of the first row of `sql`'s answer."""
    row = conn.execute(sql, params).fetchone()
    return None if row is None else next(iter(row.values()))


def _waiting(conn: psycopg.Connection[Any], lock: tuple[int, int]) -> int:
    """How many sessions wait for the advisory lock `lock` (two int4 keys)."""
    return int(
        _one(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid = %s AND objid = %s AND objsubid = 2",
            lock,
        )
    )


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
        # The end is stamped before SIGCONT: on a loaded host the resumed process can start
        # a handler dispatched before the stop ahead of this thread's next clock reading,
        # and the checker excuses such a start only if it comes after the pause's end.
        resumed = _now()
        victim.resume()
        self._hit(fault.kind, victim, record.start, resumed)

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
        resumed = _now()  # before SIGCONT, as for a consumer's pause
        leader.resume()
        self._hit(fault.kind, leader, record.start, resumed)

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
        # Only from a group above its smallest size: a small group can be there for a
        # moment while a consumer a poison message took down is being replaced, and the
        # fault is not to be lost to that moment.
        candidates = [
            p for p in self._consumers()
            if len(self._members(self.group_of[p])) > max(1, self.strength[self.group_of[p]] // 2)
        ]  # fmt: skip
        if not candidates:
            record.note = "skipped: every group at its smallest"
            return
        victim = candidates[fault.victim % len(candidates)]
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
        if fault.variant.startswith("rebalance"):
            self._rebalance_lock(fault, record)
            return
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

    def _rebalance_lock(self, fault: Fault, record: Executed) -> None:
        """A consumer joins a group while a session holds the group's gate
        (public.pgcg_chaos_gate, journal.REBALANCE_GATE): every rebalance that has read the
        join, and so revokes partitions for the joiner, waits on that lock before it locks
        the assignment rows and writes the revocation, until the gate is let go `hold`
        after the join. Meanwhile the owners' heartbeats still see their partitions
        assigned and renew their leases. `rebalance-stall`: the network of every other member of
        the group stalls as the gate is let go, past their leases, so they hear of the
        revocation only once their leases have run out and work on until then."""
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
            members.remove(leaver)
        waits: dict[tuple[int, datetime], float] = {}
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    "INSERT INTO public.pgcg_chaos_gate (group_name) VALUES (%s) "
                    "ON CONFLICT (group_name) DO UPDATE SET since = clock_timestamp()",
                    (group,),
                )
                with conn.transaction():
                    conn.execute(
                        "SELECT 1 FROM public.pgcg_chaos_gate WHERE group_name = %s FOR UPDATE",
                        (group,),
                    )
                    gate_pid = conn.info.backend_pid
                    joiner = self.spawn_consumer(group)
                    record.victims.append(joiner.name)
                    self._hit("member-join", joiner, record.start, record.start)
                    started = time.monotonic()
                    # A process starting on a loaded host can take many seconds to join.
                    cap = self.session_timeout + 20.0
                    joined = False
                    while not joined and time.monotonic() - started < cap and joiner.alive:
                        joined = bool(self._query(
                            "SELECT 1 FROM pgcg.consumer_groups WHERE group_name = %s "
                            "AND pid = %s", (group, joiner.pid),
                        ))  # fmt: skip
                        time.sleep(0 if joined else 0.02)
                    joined_after = time.monotonic() - started
                    release = time.monotonic() + fault.hold
                    while time.monotonic() < release:
                        # Who waits on the gate, and since when: the proof that a
                        # rebalance really waited on a lock after it read the join.
                        for row in self._query(
                            "SELECT pid, query_start, "
                            "extract(epoch FROM clock_timestamp() - query_start) AS s "
                            "FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                            (gate_pid,),
                        ):
                            waits[(row["pid"], row["query_start"])] = float(row["s"])
                        time.sleep(0.05)
                    stalled: list[Proc] = []
                    if fault.variant == "rebalance-stall":
                        stall = self.session_timeout + 1.0
                        for proc in self._members(group):
                            if proc is not joiner and proc in self.proxies:
                                record.victims.append(proc.name)
                                self.proxies[proc].stall(stall)
                                stalled.append(proc)
                    conn.execute("DELETE FROM public.pgcg_chaos_gate WHERE group_name = %s",
                                 (group,))  # fmt: skip
                let_go = _now()
            if stalled:
                time.sleep(self.session_timeout + 1.0)
                end = _now()
                for proc in stalled:
                    self.proxies[proc].heal()
                    self._hit("net-stall", proc, let_go, end)
        except psycopg.OperationalError as exc:  # a server restart meanwhile
            record.note = f"gate lost: {exc}".splitlines()[0]
            return
        longest = max(waits.values(), default=0.0)
        record.note = (
            f"joined after {joined_after:.1f}s, held {fault.hold:.1f}s more; "
            f"{len(waits)} wait(s) on the gate, longest seen {longest:.1f}s"
            + (f"; {len(stalled)} owner(s) stalled" if stalled else "")
        )
        if not joined:
            record.note += " (the joiner never joined)"

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

    def _revoke_cancel_fetch(self, fault: Fault, record: Executed) -> None:
        """A revocation issued and called off while a group's fetches are in flight, with
        the rows they read before it (journal.HOLD_FETCHES): the group's fetches wait
        before they read, so messages of most keys pile up behind them; then they read
        and wait again, rows in hand. A member with no process behind it joins, so the
        leader revokes partitions in its favour; once their owners have heard (a heartbeat
        since), the fetches are let go, and the member leaves, so the leader calls off
        what still revokes. The rows reach readers whose partitions are revoking: a key's
        later messages among them must not run before the earlier ones the revocation
        dropped."""
        groups = list(self.strength)
        group = groups[fault.victim % len(groups)]
        member = f"chaos-nemesis-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        params = {
            "group": group, "member": member, "host": "chaos-nemesis", "pid": os.getpid(),
            "session_timeout_ms": round(self.session_timeout * 1000),
        }  # fmt: skip
        record.victims.append(group)
        try:
            with psycopg.connect(
                self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=5
            ) as conn:
                held, revoked, heard = self._hold_fetches(conn, group, params)
                if not held:
                    record.note = "skipped: no fetch with rows came"
                    return
                started = time.monotonic()
                while _waiting(conn, FETCH_HOLD_LOCK) and time.monotonic() - started < 2.0:
                    time.sleep(0.005)
                # Their readers take the rows in (or leave them out) before the leader
                # calls the revocation off.
                time.sleep(0.1)
                left = _now()
                with conn.transaction():
                    conn.execute(MEMBER.leave, params | {"event": "leave"})
                    conn.execute(MEMBER.notify_coordinator, params | {"event": "leave"})
                started = time.monotonic()
                rows: list[dict[str, Any]] = revoked
                while rows and time.monotonic() - started < self.session_timeout + 5:
                    rows = conn.execute(
                        "SELECT partition FROM pgcg.partition_assignments "
                        "WHERE group_name = %s AND state = 'revoking' AND target_member_id = %s",
                        (group, member),
                    ).fetchall()
                    time.sleep(0.02)
                kept = _one(
                    conn,
                    "SELECT count(*) FROM pgcg.partition_assignments AS pa "
                    "JOIN unnest(%s::int[], %s::bigint[], %s::text[]) AS r(p, e, m) "
                    "ON pa.partition = r.p AND pa.epoch = r.e AND pa.member_id = r.m "
                    "WHERE pa.group_name = %s AND pa.state = 'assigned'",
                    ([r["partition"] for r in revoked], [r["epoch"] for r in revoked],
                     [r["member_id"] for r in revoked], group),
                )  # fmt: skip
        except psycopg.OperationalError as exc:  # a server restart meanwhile
            record.note = f"interrupted: {exc}".splitlines()[0]
            self._leave(params)
            return
        self._hit("member-join", None, record.start, left)
        record.note = (
            f"{held} fetch(es) held; {len(revoked)} partition(s) revoked, owners heard "
            f"{'yes' if heard else 'NO'}; {kept} called off"
        )

    def _hold_fetches(
        self, conn: psycopg.Connection[Any], group: str, params: dict[str, Any]
    ) -> tuple[int, list[dict[str, Any]], bool]:
        """Holds the group's fetches, first before they read, then with their rows; joins
        the member and waits for revocations in its favour and for their owners to hear of
        them; lets the fetches go. Returns how many fetches waited with rows, the
        partitions revoked (partition, epoch, member_id) and whether every owner heard."""
        held, revoked, heard = 0, [], False
        conn.execute("SELECT pg_advisory_lock(%s, %s)", FETCH_HOLD_LOCK)
        conn.execute("SELECT pg_advisory_lock(%s, %s)", FETCH_GATE_LOCK)
        try:
            conn.execute(
                "INSERT INTO public.pgcg_chaos_fetch_hold VALUES (%s) ON CONFLICT DO NOTHING",
                (group,),
            )
            readers = len(self._members(group))
            gated = self._await_waiters(conn, FETCH_GATE_LOCK, readers)
            # Messages pile up behind the gate, so each read brings some of most keys.
            time.sleep(0.5)
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", FETCH_GATE_LOCK)
            held = self._await_waiters(conn, FETCH_HOLD_LOCK, max(gated, 1))
            if not held:
                return held, revoked, heard
            with conn.transaction():
                conn.execute(MEMBER.join, params)
                conn.execute(MEMBER.notify_coordinator, params | {"event": "join"})
            started = time.monotonic()
            while time.monotonic() - started < self.session_timeout and not revoked:
                revoked = conn.execute(
                    "SELECT partition, epoch, member_id, clock_timestamp() AS seen "
                    "FROM pgcg.partition_assignments "
                    "WHERE group_name = %s AND state = 'revoking' AND target_member_id = %s",
                    (group, params["member"]),
                ).fetchall()
                if not revoked:
                    time.sleep(0.005)
            # An owner heard of its revocation in a heartbeat that began after it: its
            # answer carried it (applied as it arrives).
            started = time.monotonic()
            while revoked and time.monotonic() - started < 2 * self.session_timeout:
                heard = _one(
                    conn,
                    "SELECT bool_and(cg.last_heartbeat > r.seen) "
                    "FROM unnest(%s::text[], %s::timestamptz[]) AS r(m, seen) "
                    "JOIN pgcg.consumer_groups AS cg "
                    "ON cg.group_name = %s AND cg.member_id = r.m",
                    ([r["member_id"] for r in revoked], [r["seen"] for r in revoked], group),
                )
                if heard:
                    break
                time.sleep(0.005)
            # Applied as the answer arrives: a moment for that.
            time.sleep(0.05)
            return held, revoked, bool(heard)
        finally:
            conn.execute("DELETE FROM public.pgcg_chaos_fetch_hold WHERE group_name = %s", (group,))
            conn.execute("SELECT pg_advisory_unlock_all()")

    def _await_waiters(self, conn: psycopg.Connection[Any], lock: tuple[int, int], n: int) -> int:
        """How many sessions wait for `lock` once `n` do, or a second after the first did
        (at most the session timeout)."""
        started = time.monotonic()
        first: float | None = None
        waiting = 0
        while time.monotonic() - started < self.session_timeout:
            waiting = _waiting(conn, lock)
            if waiting and first is None:
                first = time.monotonic()
            if waiting >= n or (first is not None and time.monotonic() - first > 1.0):
                break
            time.sleep(0.005)
        return waiting

    def _leave(self, params: dict[str, Any]) -> None:
        """The member with no process behind it leaves (after a server restart)."""
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(MEMBER.leave, params | {"event": "leave"})
                conn.execute(MEMBER.notify_coordinator, params | {"event": "leave"})
        except psycopg.OperationalError:
            pass  # its session times out, and the leader expels it

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
