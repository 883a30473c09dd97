"""One rebalance of one group: the whole group protocol's decision logic lives here.

In one transaction on the leader's session, fenced by the leader row, whose lock waits
are each bounded by `lock_timeout` (past it the transaction aborts, writing nothing, and
the coordinator retries):
  1. expire members silent for their session timeout, timed on the coordinator's own
     clock (expiry.py), never on the database's;
  2. ask the assignor (pure) for the target over the live members;
  3. move partitions revoke-before-assign:
     - unowned, or owner dead             -> assign to the target now (epoch + 1)
     - owner live, target differs         -> revoking: the owner drains and releases to
                                             the target itself (epoch + 1 then)
     - revoking past its drain deadline   -> forced: assign to the target (epoch + 1),
       on the database's clock and on the     which fences the slow owner
       coordinator's own (drains.py)
     - revoking, target is the owner again -> back to assigned
  4. record the rebalance and NOTIFY the group.

A rebalance that changes something is a `pgcg rebalance` span (from the start of the
transaction to its commit; the sweeps that find nothing to do emit none) with the group,
leader epoch, generation, reason, members and every move from -> to, one event per move;
it is counted and timed in the pgcg.rebalance* metrics, and its log records carry its
trace id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgcg.coordinator.assignor import assign
from pgcg.coordinator.drains import DrainWatch
from pgcg.coordinator.expiry import MemberWatch
from pgcg.shared import metrics, tracing
from pgcg.shared.db import AsyncConn, translated
from pgcg.shared.errors import LostOwnership
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.coordinator.rebalancer")
Q = Queries("coordinator")

# Until a rebalance commits, owners' heartbeats still see the old assignments and renew
# their leases on them; a rebalance stuck behind a lock must give up well within a lease
# margin (at least 1 s) rather than commit a hand-off its owners have not heard of.
DEFAULT_LOCK_TIMEOUT = 0.5
# The same holds for a leader that stalls between two statements of a rebalance (SIGSTOP,
# a frozen host): the server ends the transaction once it has idled this long. Longer
# than the lock bound, because ending it also ends the leader's session and its lock.
DEFAULT_IDLE_TIMEOUT = 1.0


class LostLeadership(LostOwnership):
    """The leader row no longer names us at this epoch: write nothing, step down."""


@dataclass(frozen=True)
class Move:
    partition: int
    from_member: str | None
    to_member: str | None
    kind: str  # assign | revoke | forced | unrevoke | unassign

    def describe(self) -> str:
        return f"{self.partition}:{self.from_member or '-'}->{self.to_member or '-'}({self.kind})"


@dataclass
class Outcome:
    group: str
    generation: int
    leader_epoch: int
    reason: str
    members: list[str]
    expired: list[str]
    moves: list[Move] = field(default_factory=list)
    duration_ms: float = 0.0
    statements: int = 0
    trace_id: str | None = None  # of its `pgcg rebalance` span, when traced


def plan(
    rows: list[dict[str, Any]], members: list[str], overdue: Collection[int] = ()
) -> tuple[list[Move], dict[int, str]]:
    """The moves from the current rows to the assignor's target. Pure.

    `overdue`: the revoking partitions whose drain deadline has passed (DrainWatch)."""
    live = set(members)
    current = {r["partition"]: r["member_id"] for r in rows if r["member_id"] in live}
    target = assign([r["partition"] for r in rows], members, current)
    moves: list[Move] = []
    for r in rows:
        p, owner, state = r["partition"], r["member_id"], r["state"]
        want = target.get(p)
        if want is None:  # nobody left to own anything
            if owner is not None and owner not in live:
                moves.append(Move(p, owner, None, "unassign"))
            continue
        if owner is None:
            moves.append(Move(p, None, want, "assign"))
        elif owner not in live:
            moves.append(Move(p, owner, want, "forced"))
        elif owner == want:
            if state == "revoking":
                moves.append(Move(p, owner, want, "unrevoke"))
        elif p in overdue:
            moves.append(Move(p, owner, want, "forced"))
        elif state == "assigned" or r["target_member_id"] != want:
            moves.append(Move(p, owner, want, "revoke"))
    return moves, target


async def rebalance(
    conn: AsyncConn,
    *,
    group: str,
    topic: str,
    leader_id: str,
    leader_epoch: int,
    leader_timeout: float,
    drain_deadline: float,
    reason: str,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    watch: MemberWatch | None = None,
    drains: DrainWatch | None = None,
) -> Outcome | None:
    """Run one rebalance; None when nothing needed to change.

    `watch`: the leader's record of its members' heartbeats (expiry.py); without one
    nobody has been watched, so nobody is expired. `drains`: its record of when each
    revocation started (drains.py); without one no drain is known to have run on our
    clock, so no hand-off is forced at a drain deadline."""
    watch = watch if watch is not None else MemberWatch()
    drains = drains if drains is not None else DrainWatch()
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    t0_ns = time.time_ns()
    params = {
        "group": group,
        "topic": topic,
        "scope": group,
        "leader": leader_id,
        "leader_epoch": leader_epoch,
        "leader_timeout_s": leader_timeout,
        "drain_deadline_s": drain_deadline,
        "lock_timeout_ms": max(1, round(lock_timeout * 1000)),
        "idle_timeout_ms": max(1, round(idle_timeout * 1000)),
    }
    statements = 0

    async def run(query: str, **extra: Any) -> list[dict[str, Any]]:
        nonlocal statements
        statements += 1
        cur = await conn.execute(query, {**params, **extra})
        return await cur.fetchall() if cur.description else []

    # The span is entered once there is something to do, but closes after the commit.
    with translated(), contextlib.ExitStack() as stack:
        async with conn.transaction():
            await run(Q.bound_lock_waits)
            if not await run(Q.lock_leadership):
                raise LostLeadership(f"no longer leader of {group} at leader epoch {leader_epoch}")
            heartbeats = await run(Q.member_heartbeats, groups=[group])
            silent = watch.observe(group, heartbeats)
            expired = []
            if silent:
                rows = await run(
                    Q.expire_members,
                    members=[r["member_id"] for r in silent],
                    heartbeats=[r["last_heartbeat"] for r in silent],
                )
                expired = [r["member_id"] for r in rows]
            members = [r["member_id"] for r in await run(Q.live_members)]
            rows = await run(Q.assignments_for_update)
            # What each owner was given to drain (the revoke statement's rule).
            drain_of = {
                r["member_id"]: max(drain_deadline, r["session_timeout_ms"] / 1000)
                for r in heartbeats
            }
            moves, _ = plan(rows, members, drains.overdue(group, rows, drain_of))
            if not moves and not expired:
                return None
            span = stack.enter_context(
                tracing.event_span(
                    "pgcg rebalance",
                    {"group": group, "topic": topic},
                    start_time=t0_ns,
                    **{"pgcg.leader_id": leader_id, "pgcg.leader_epoch": leader_epoch},
                )
            )
            by_kind: dict[str, list[Move]] = {}
            for move in moves:
                by_kind.setdefault(move.kind, []).append(move)
            direct = by_kind.get("assign", []) + by_kind.get("forced", [])
            if direct:
                await run(
                    Q.assign,
                    partitions=[m.partition for m in direct],
                    members=[m.to_member for m in direct],
                )
            if revokes := by_kind.get("revoke"):
                await run(
                    Q.revoke,
                    partitions=[m.partition for m in revokes],
                    targets=[m.to_member for m in revokes],
                )
                epoch_of = {r["partition"]: r["epoch"] for r in rows}
                drains.revoked(group, [(m.partition, epoch_of[m.partition]) for m in revokes])
            if unrevokes := by_kind.get("unrevoke"):
                await run(Q.unrevoke, partitions=[m.partition for m in unrevokes])
            if unassigns := by_kind.get("unassign"):
                await run(Q.unassign, partitions=[m.partition for m in unassigns])
            generation = int((await run(Q.next_generation))[0]["generation"])
            if expired:
                reason = f"{reason}; expired {len(expired)} member(s)"
            if by_kind.get("forced"):
                reason = f"{reason}; forced {len(by_kind['forced'])} hand-off(s)"
            duration_ms = (time.perf_counter() - t0) * 1000
            await run(
                Q.record_rebalance,
                generation=generation,
                reason=reason,
                members=len(members),
                moves=json.dumps([m.__dict__ for m in moves]),
                started_at=started_at,
                duration_ms=duration_ms,
            )
            await run(Q.notify_group)
        outcome = Outcome(
            group=group,
            generation=generation,
            leader_epoch=leader_epoch,
            reason=reason,
            members=members,
            expired=expired,
            moves=moves,
            duration_ms=(time.perf_counter() - t0) * 1000,
            statements=statements,
        )
        if span.is_recording():
            outcome.trace_id = format(span.get_span_context().trace_id, "032x")
            _describe(span, outcome)
        _measure(outcome)
        for move in moves:
            if move.kind == "forced":
                log.warning(
                    "forced hand-off of partition %s from %s to %s",
                    move.partition, move.from_member, move.to_member,
                    extra={"action": "forced_handoff", "group": group,
                           "partition": move.partition, "from_member": move.from_member,
                           "to_member": move.to_member, "leader_epoch": leader_epoch,
                           "generation": generation},
                )  # fmt: skip
        log.info(
            "rebalance %s of %s: %s member(s), %s move(s) [%s] in %.1f ms (%s)",
            generation, group, len(members), len(moves),
            " ".join(m.describe() for m in moves), outcome.duration_ms, reason,
            extra={"action": "rebalance", "group": group, "leader_epoch": leader_epoch,
                   "generation": generation, "reason": reason, "members": members,
                   "expired": expired, "moves": [m.describe() for m in moves],
                   "duration_ms": round(outcome.duration_ms, 2)},
        )  # fmt: skip
    return outcome


def reason_kind(reason: str) -> str:
    """The bounded part of a reason ("member join (host-1-ab)" -> "member join"), for
    metric attributes; the full reason goes on the span and the log record."""
    return reason.split(";", 1)[0].split(" (", 1)[0].strip()


def _describe(span: Any, outcome: Outcome) -> None:
    kinds: dict[str, int] = {}
    for move in outcome.moves:
        kinds[move.kind] = kinds.get(move.kind, 0) + 1
    span.set_attributes(
        {
            "pgcg.generation": outcome.generation,
            "pgcg.reason": outcome.reason,
            "pgcg.members": outcome.members,
            "pgcg.member_count": len(outcome.members),
            "pgcg.expired": outcome.expired,
            "pgcg.moves": [m.describe() for m in outcome.moves],
            "pgcg.moved": len(outcome.moves),
            **{f"pgcg.moves.{kind}": n for kind, n in kinds.items()},
            "pgcg.statements": outcome.statements,
        }
    )
    for move in outcome.moves:
        span.add_event(
            "move",
            {
                tracing.PARTITION: str(move.partition),
                "pgcg.from_member": move.from_member or "",
                "pgcg.to_member": move.to_member or "",
                "pgcg.kind": move.kind,
            },
        )


def _measure(outcome: Outcome) -> None:
    attributes = {tracing.MESSAGING_SYSTEM: tracing.SYSTEM, tracing.CONSUMER_GROUP: outcome.group}
    metrics.rebalances.add(1, {**attributes, "pgcg.reason": reason_kind(outcome.reason)})
    metrics.rebalance_duration.record(outcome.duration_ms / 1000, attributes)
    kinds: dict[str, int] = {}
    for move in outcome.moves:
        kinds[move.kind] = kinds.get(move.kind, 0) + 1
    for kind, n in kinds.items():
        metrics.partitions_moved.add(n, {**attributes, "pgcg.kind": kind})
