"""A live group of real processes, and the membership events the benchmark times on it.

Two coordinators (one leads, one stands by) and a few consumers run as `pgcg` processes
(bench/cluster.py) with the recording handler; a producer keeps every partition busy.
Each scenario returns its figures in seconds and leaves the group as it found it: the
same number of consumers, two coordinators, balanced, a standby ready.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from pgcg.bench.chaos import journal
from pgcg.bench.cluster import Cluster, Proc
from pgcg.bench.probe import BenchTimeout, GroupProbe, wait_for
from pgcg.shared.queries import Queries

CONSUMER_Q = Queries("consumer")
HANDLER = "pgcg.bench.chaos.journal:record"
HANDLER_WORK_MS = 2  # simulated work per message, as in tests/test_cluster.py
# A phantom member outlives any scenario it is used in, then leaves explicitly.
PHANTOM_SESSION_MS = 300_000
# Seconds a scenario waits for the group to work off a backlog before it starts anyway
# (a host too busy to keep up shows as backlog_at_start in the figures).
CATCH_UP = 30.0


@dataclass(frozen=True)
class Profile:
    """The timing settings every process of a run gets."""

    name: str
    heartbeat_interval: float
    session_timeout: float
    leader_timeout: float
    drain_deadline: float

    def env(self) -> dict[str, str]:
        return {
            "PGCG_HEARTBEAT_INTERVAL": str(self.heartbeat_interval),
            "PGCG_SESSION_TIMEOUT": str(self.session_timeout),
            "PGCG_LEADER_TIMEOUT": str(self.leader_timeout),
            "PGCG_DRAIN_DEADLINE": str(self.drain_deadline),
            "PGCG_LOG_LEVEL": "INFO",
            journal.WORK_ENV: str(HANDLER_WORK_MS),
        }


def _log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def _since(t: float, origin: float) -> float:
    return round(t - origin, 3)


def _stopped(pid: int) -> bool:
    """True once the kernel reports the process stopped (Linux); else assume it is."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return True


class GroupRun:
    def __init__(
        self,
        dsn: str,
        profile: Profile,
        workdir: Path,
        *,
        run_id: str,
        partitions: int,
        consumers: int,
        rate: float,
        keys: int,
    ) -> None:
        self.dsn = dsn
        self.profile = profile
        self.group = f"bench-rb-{profile.name}-{run_id}"
        self.topic = f"bench_rb_{profile.name}_{run_id}"
        self.partitions = partitions
        self.n_consumers = consumers
        self.cluster = Cluster(dsn, workdir / profile.name, env=profile.env())
        self.producer = journal.Producer(dsn, self.topic, keys=keys, rate=rate)
        self.caught_up = max(int(rate), 50)  # about a second of production
        self.probe: GroupProbe | None = None
        self.consumers: list[Proc] = []
        self.coordinators: list[Proc] = []
        # A coordinator counts as a ready standby once it logs `standby` after this time.
        self._standby_after: dict[Proc, float] = {}
        self._coordinators_started = 0

    @property
    def p(self) -> GroupProbe:
        assert self.probe is not None, "start() first"
        return self.probe

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pgcg.create_topic(%s, %s)", (self.topic, self.partitions))
            journal.create(conn)
        self.probe = GroupProbe(
            self.dsn, self.group, self.topic, leader_timeout=self.profile.leader_timeout
        )
        for _ in range(2):
            self._add_coordinator()
        for _ in range(self.n_consumers):
            self._add_consumer()
        self.producer.start()
        self.settle(60)
        self.standby_ready(30)

    def stop(self) -> None:
        self.producer.stop()
        self.cluster.stop_all(timeout=15)
        if self.probe is not None:
            self.probe.close()

    def _add_coordinator(self) -> Proc:
        self._coordinators_started += 1
        name = f"coord-{self._coordinators_started}"
        # --group: on a shared database the benchmark's coordinators lead its group only.
        proc = self.cluster.coordinator("--group", self.group, name=name)
        self.coordinators.append(proc)
        self._standby_after[proc] = 0.0
        return proc

    def _add_consumer(self) -> Proc:
        proc = self.cluster.consumer(
            self.group, self.topic, HANDLER, name=f"consumer-{len(self.consumers) + 1}"
        )
        self.consumers.append(proc)
        return proc

    # -- conditions --------------------------------------------------------------------------

    def _balanced(self) -> bool:
        """Every live consumer is a member (and nobody else), every partition is assigned
        to one of them, loads differ by at most one, and a leader is renewing."""
        live = {p.pid for p in self.cluster.live("consumer") if not p.paused}
        members = self.p.members()
        if sorted(m["pid"] for m in members.values()) != sorted(live):
            return False
        load: collections.Counter[str] = collections.Counter()
        for row in self.p.assignments():
            if row["state"] != "assigned" or row["member_id"] not in members:
                return False
            load[row["member_id"]] += 1
        if set(load) != set(members) or max(load.values()) - min(load.values()) > 1:
            return False
        leader = self.p.leader()
        return bool(leader and leader["fresh"])

    def settle(self, timeout: float) -> None:
        """Balanced, and (for up to CATCH_UP s more) caught up with the producer, so each
        scenario starts from a steady group rather than from the last one's backlog."""
        wait_for(self._balanced, timeout, "the group to be balanced over its live consumers")
        with contextlib.suppress(BenchTimeout):
            wait_for(lambda: self.p.backlog() <= self.caught_up, CATCH_UP, "catching up", 0.1)

    def _leader_proc(self) -> tuple[Proc, int] | None:
        proc, epoch = self.cluster.leader(self.group)
        return (proc, epoch) if proc is not None and proc.alive else None

    def standby_ready(self, timeout: float) -> tuple[Proc, Proc]:
        """The leader and a standby that has announced itself since it (re)started."""

        def ready() -> tuple[Proc, Proc] | None:
            found = self._leader_proc()
            if found is None:
                return None
            leader = found[0]
            for proc in self.cluster.live("coordinator"):
                if proc is leader or proc.paused:
                    continue
                since = self._standby_after.get(proc, 0.0)
                if any(_log_time(r) >= since for r in proc.actions("standby")):
                    return leader, proc
            return None

        return wait_for(ready, timeout, "a leader and a ready standby", every=0.1)

    def _first_handled(
        self, mark: int, wanted: dict[int, tuple[str, int]]
    ) -> dict[int, float] | None:
        """Per partition in `wanted` (partition -> (member, epoch)), when that member first
        finished a message of it under that epoch or a later one; None until all have."""
        members = sorted({m for m, _ in wanted.values()})
        seen = self.p.first_handled(mark, members)
        first: dict[int, float] = {}
        for partition, (member, epoch) in wanted.items():
            mine = [
                t for (p, m, e), t in seen.items() if (p, m) == (partition, member) and e >= epoch
            ]
            if not mine:
                return None
            first[partition] = min(mine)
        return first

    def _learned(
        self, wanted: dict[int, tuple[str, int]], pids: dict[str, int]
    ) -> dict[int, float]:
        """Per partition, when its owner logged `partition_assigned` for that epoch: the
        moment the member knew (the NOTIFY path), before it fetched or handled anything."""
        learned: dict[int, float] = {}
        for partition, (member, epoch) in wanted.items():
            proc = self.cluster.by_pid(pids.get(member, -1))
            times = [
                _log_time(r)
                for r in (proc.actions("partition_assigned") if proc else [])
                if r.get("partition") == partition and r.get("epoch") == epoch
            ]
            learned[partition] = min(times) if times else math.nan
        return learned

    # -- scenarios ---------------------------------------------------------------------------

    def join(self) -> dict[str, Any]:
        """A consumer starts: from its join to owning its share, and to having handled a
        message from every partition of it."""
        p = self.p
        backlog = p.backlog()
        mark = p.journal_mark()
        spawned = time.time()
        proc = self._add_consumer()
        member = wait_for(lambda: p.member_of(proc.pid), 30, "the new consumer to join")
        joined = p.local(member["joined_at"])
        self.settle(30)
        share = {
            r["partition"]: r for r in p.assignments() if r["member_id"] == member["member_id"]
        }
        owns = max(p.local(r["assigned_at"]) for r in share.values())
        wanted = {part: (r["member_id"], r["epoch"]) for part, r in share.items()}
        handled = wait_for(
            lambda: self._first_handled(mark, wanted), 30, "handling from its whole share", 0.1
        )
        learned = self._learned(wanted, {member["member_id"]: proc.pid})
        return {
            "spawn_to_join_s": joined - spawned,
            "owns_share_s": owns - joined,
            "learned_share_s": max(learned.values()) - joined,
            "handled_share_s": max(handled.values()) - joined,
            "share": len(share),
            "backlog_at_start": backlog,
            # [partition, assigned, learned, first handled], seconds after the join
            "per_partition": [
                [
                    part,
                    _since(p.local(r["assigned_at"]), joined),
                    _since(learned[part], joined),
                    _since(handled[part], joined),
                ]
                for part, r in sorted(share.items())
            ],
        }

    def member_kill(self) -> dict[str, Any]:
        """SIGKILL of the oldest consumer: until each of its partitions has a new owner,
        and until each new owner handled a message of it. The join before it added the
        consumer this one takes away."""
        p = self.p
        victim = next(c for c in self.consumers if c.alive)
        member = p.member_of(victim.pid)
        assert member is not None
        vid = member["member_id"]
        parts = [r["partition"] for r in p.assignments() if r["member_id"] == vid]
        generation = p.generation()
        backlog = p.backlog()
        mark = p.journal_mark()
        killed = time.time()
        victim.kill()
        last_heartbeat = p.local(p.members()[vid]["last_heartbeat"])
        timeout = self.profile.session_timeout * 2 + 15

        def moved() -> dict[int, dict[str, Any]] | None:
            rows = {r["partition"]: r for r in p.assignments() if r["partition"] in parts}
            ok = all(r["state"] == "assigned" and r["member_id"] != vid for r in rows.values())
            return rows if ok else None

        new = wait_for(moved, timeout, "the killed member's partitions to be reassigned")
        reassigned = max(p.local(r["assigned_at"]) for r in new.values())
        wanted = {part: (r["member_id"], r["epoch"]) for part, r in new.items()}
        handled = wait_for(
            lambda: self._first_handled(mark, wanted), 30, "handling by the new owners", 0.1
        )
        expiry = p.first_move_away(vid, generation)
        members = {m: row["pid"] for m, row in p.members().items()}
        learned = self._learned(wanted, members)
        self.settle(30)
        return {
            "heartbeat_age_at_kill_s": killed - last_heartbeat,
            "expired_s": p.local(expiry["started_at"]) - killed if expiry else float("nan"),
            # From the moment the member could be expired (last heartbeat + session
            # timeout) to the rebalance that expired it: the sweep's granularity.
            "expiry_noticed_after_s": (
                p.local(expiry["started_at"]) - (last_heartbeat + self.profile.session_timeout)
                if expiry
                else float("nan")
            ),
            "reassigned_s": reassigned - killed,
            "learned_s": max(learned.values()) - killed,
            "handled_s": max(handled.values()) - killed,
            "partitions": len(parts),
            "backlog_at_start": backlog,
            # [partition, new owner's pid, reassigned, learned, first handled], seconds
            # after the kill
            "per_partition": [
                [
                    part,
                    members.get(r["member_id"], 0),
                    _since(p.local(r["assigned_at"]), killed),
                    _since(learned[part], killed),
                    _since(handled[part], killed),
                ]
                for part, r in sorted(new.items())
            ],
        }

    def leader_fault(self, how: str) -> dict[str, Any]:
        """SIGKILL or SIGSTOP of the leader: until the standby is elected (a new leader
        epoch) and until the new leader's first recorded rebalance.

        A rebalance with nothing to change writes no row, so a phantom member joins the
        moment the leader is gone, as a real one might: the new leader's first rebalance
        then has work to do and is recorded. The phantom leaves afterwards.
        """
        p = self.p
        leader, standby = self.standby_ready(30)
        old = p.leader()
        assert old is not None
        old_epoch = int(old["leader_epoch"])
        faulted = time.time()
        if how == "kill":
            leader.kill()
        else:
            leader.pause()
            wait_for(lambda: _stopped(leader.pid), 5, "the leader to stop")
        phantom = self._phantom_join()
        timeout = self.profile.leader_timeout * 2 + 15
        try:
            new = wait_for(
                lambda: (row := p.leader()) and row["leader_epoch"] > old_epoch and row,
                timeout,
                "a new leader epoch",
            )
            first = wait_for(
                lambda: p.first_rebalance_of_new_leader(old_epoch),
                timeout,
                "the new leader's first rebalance",
            )
        finally:
            self._phantom_leave(phantom)
            if how == "kill":
                self._add_coordinator()  # two coordinators again for the next scenario
            else:
                leader.resume()
                self._standby_after[leader] = time.time()
        terminated = [
            _log_time(r) for r in standby.actions("leader_terminated") if _log_time(r) >= faulted
        ]
        result: dict[str, Any] = {
            "elected_s": p.local(new["elected_at"]) - faulted,
            "first_rebalance_s": p.local(first["started_at"]) - faulted,
            "first_rebalance_reason": first["reason"],
            "new_leader_is_standby": str(standby.pid) in str(new["leader_id"]),
        }
        if how == "stop" and terminated:
            result["terminated_s"] = min(terminated) - faulted
            # One election interval here means the standby took over a tick after it
            # terminated the silent leader, not in the same tick.
            result["elected_after_terminated_s"] = result["elected_s"] - result["terminated_s"]
        self.settle(30)
        self.standby_ready(30)
        return result

    def _phantom_join(self) -> str:
        """A member row with no process behind it, joined with the consumers' own statement."""
        member = f"bench-phantom-{uuid.uuid4().hex[:8]}"
        params = {
            "group": self.group,
            "topic": self.topic,
            "member": member,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "session_timeout_ms": PHANTOM_SESSION_MS,
            "event": "join",
        }
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            conn.execute(CONSUMER_Q.join, params)
            conn.execute(CONSUMER_Q.notify_coordinator, params)
        return member

    def _phantom_leave(self, member: str) -> None:
        params = {"group": self.group, "member": member, "event": "leave"}
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            conn.execute(CONSUMER_Q.leave, params)
            conn.execute(CONSUMER_Q.notify_coordinator, params)


__all__ = ["BenchTimeout", "GroupRun", "Profile"]
