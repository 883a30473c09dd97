"""One rebalance of one group: the whole group protocol's decision logic lives here.

In one transaction on the leader's session, fenced by the leader row:
  1. expire members whose heartbeat is older than their session timeout;
  2. ask the assignor (pure) for the target over the live members;
  3. move partitions revoke-before-assign:
     - unowned, or owner dead             -> assign to the target now (epoch + 1)
     - owner live, target differs         -> revoking: the owner drains and releases to
                                             the target itself (epoch + 1 then)
     - revoking past its drain deadline   -> forced: assign to the target (epoch + 1),
                                             which fences the slow owner
     - revoking, target is the owner again -> back to assigned
  4. record the rebalance and NOTIFY the group.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from pgcg.coordinator.assignor import assign
from pgcg.shared.db import AsyncConn, translated
from pgcg.shared.errors import LostOwnership
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.coordinator.rebalancer")
tracer = trace.get_tracer("pgcg.coordinator")
Q = Queries("coordinator")


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


def plan(rows: list[dict[str, Any]], members: list[str]) -> tuple[list[Move], dict[int, str]]:
    """The moves from the current rows to the assignor's target. Pure."""
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
        elif r["overdue"]:
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
) -> Outcome | None:
    """Run one rebalance; None when nothing needed to change."""
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    params = {
        "group": group,
        "topic": topic,
        "scope": group,
        "leader": leader_id,
        "leader_epoch": leader_epoch,
        "leader_timeout_s": leader_timeout,
        "drain_deadline_s": drain_deadline,
    }
    statements = 0

    async def run(query: str, **extra: Any) -> list[dict[str, Any]]:
        nonlocal statements
        statements += 1
        cur = await conn.execute(query, {**params, **extra})
        return await cur.fetchall() if cur.description else []

    with translated(), tracer.start_as_current_span("pgcg rebalance") as span:
        async with conn.transaction():
            if not await run(Q.lock_leadership):
                raise LostLeadership(f"no longer leader of {group} at leader epoch {leader_epoch}")
            expired = [r["member_id"] for r in await run(Q.expire_members)]
            members = [r["member_id"] for r in await run(Q.live_members)]
            rows = await run(Q.assignments_for_update)
            moves, _ = plan(rows, members)
            if not moves and not expired:
                return None
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
        span.set_attributes(
            {
                "messaging.system": "pgcg",
                "messaging.consumer.group.name": group,
                "messaging.destination.name": topic,
                "pgcg.leader_epoch": leader_epoch,
                "pgcg.generation": generation,
                "pgcg.reason": reason,
                "pgcg.members": len(members),
                "pgcg.moves": [m.describe() for m in moves],
                "pgcg.expired": expired,
            }
        )
    for move in moves:
        if move.kind == "forced":
            log.warning(
                "forced hand-off of partition %s from %s to %s",
                move.partition, move.from_member, move.to_member,
                extra={"action": "forced_handoff", "group": group, "partition": move.partition,
                       "from_member": move.from_member, "to_member": move.to_member,
                       "leader_epoch": leader_epoch, "generation": generation},
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
