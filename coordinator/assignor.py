"""Sticky, balanced partition assignment, as a pure function.

The leader calls `assign` on every rebalance and hands the result to `moves` to learn which
partitions must be revoked and granted. Keeping this free of I/O lets hypothesis check the
invariants the rest of the coordinator relies on (one live owner per partition, loads within
one of each other, as few revocations as balance allows) without a database.
"""

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

_Id = TypeVar("_Id", int, str)


@dataclass(frozen=True)
class Move:
    """One partition changing hands.

    `from_member` is whatever `current` named, even a member that has since died, so the caller
    can tell a revocation from a live member (which must be fenced) from a pickup of an orphan.
    """

    partition: int
    from_member: str | None
    to_member: str


def assign(
    partitions: Sequence[int],
    members: Sequence[str],
    current: Mapping[int, str | None],
) -> dict[int, str]:
    """Target owner for every partition.

    Owners in `current` that are not in `members` count as unowned, and entries for partitions
    outside `partitions` are ignored, so the caller can pass the raw ownership table. Raises
    ValueError on duplicate members or partitions: either means the caller's view is corrupt,
    and guessing would hand one partition to two consumers.
    """
    live = _sorted_unique(members, "member")
    if not live:
        return {}
    wanted = _sorted_unique(partitions, "partition")
    held = _held_by(wanted, live, current)
    quota = _quotas(len(wanted), live, held)

    target: dict[int, str] = {}
    pool = [p for p in wanted if current.get(p) not in held]
    for member in live:
        mine = held[member]
        # Keeping the lowest-numbered ones makes the choice independent of dict order.
        for p in mine[: quota[member]]:
            target[p] = member
        pool.extend(mine[quota[member] :])
    pool.sort()

    # Members below quota kept everything they held. Their deficits add up to exactly
    # len(pool), so the heap never runs dry before the pool does.
    hungry = [(len(held[m]), m) for m in live if len(held[m]) < quota[m]]
    heapq.heapify(hungry)
    for p in pool:
        count, member = heapq.heappop(hungry)
        target[p] = member
        if count + 1 < quota[member]:
            heapq.heappush(hungry, (count + 1, member))

    return {p: target[p] for p in wanted}


def moves(current: Mapping[int, str | None], target: Mapping[int, str]) -> list[Move]:
    """Partitions whose owner changes, sorted by partition.

    Partitions in `current` but absent from `target` are not moves: nobody receives them (the
    group is empty or the partition is gone), so there is nothing to grant.
    """
    return [
        Move(p, current.get(p), owner)
        for p, owner in sorted(target.items())
        if current.get(p) != owner
    ]


def _sorted_unique(items: Sequence[_Id], what: str) -> list[_Id]:
    ordered = sorted(items)
    for a, b in pairwise(ordered):
        if a == b:
            raise ValueError(f"duplicate {what} {a!r}")
    return ordered


def _held_by(
    wanted: list[int], live: list[str], current: Mapping[int, str | None]
) -> dict[str, list[int]]:
    """Each live member's current partitions, ascending because `wanted` is."""
    held: dict[str, list[int]] = {m: [] for m in live}
    for p in wanted:
        owner = current.get(p)
        if owner in held:
            held[owner].append(p)
    return held


def _quotas(total: int, live: list[str], held: dict[str, list[int]]) -> dict[str, int]:
    """floor(P/M) for everyone, +1 for the P mod M members that already hold the most.

    Handing the spare slots to the biggest holders is what makes revocations minimal: a member
    above floor keeps one more partition for each spare slot it gets, anyone else gains nothing.
    """
    base, extra = divmod(total, len(live))
    ranked = sorted(live, key=lambda m: (-len(held[m]), m))
    return {m: base + (1 if rank < extra else 0) for rank, m in enumerate(ranked)}
