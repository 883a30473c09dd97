"""What this member owns, as last read from partition_assignments, and the transitions:
started, revoked (drain, then release) and lost (stop at once)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from pgcg.consumer.member import AssignmentRow
from pgcg.consumer.scheduler import KeyScheduler

log = logging.getLogger("pgcg.consumer.assignment")


@dataclass(eq=False)
class Owned:
    partition: int
    epoch: int
    state: str  # assigned | revoking
    adopted: bool = False  # our earlier claims under this epoch were put back (see adopt)
    revoke_by: float | None = None  # monotonic: cancel in-flight work and release by then
    scopes: set[anyio.CancelScope] = field(default_factory=set)


@dataclass
class Changes:
    started: list[Owned] = field(default_factory=list)
    revoked: list[Owned] = field(default_factory=list)
    lost: list[Owned] = field(default_factory=list)
    resumed: list[Owned] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.started or self.revoked or self.lost or self.resumed)


class Assignment:
    def __init__(
        self, scheduler: KeyScheduler, fields: Callable[[], dict[str, Any]], margin: float
    ) -> None:
        self.scheduler = scheduler
        self._fields = fields  # read at each log line: the member id changes on a rejoin
        self.margin = margin
        self.owned: dict[int, Owned] = {}

    @property
    def fields(self) -> dict[str, Any]:
        return self._fields()

    def apply(self, rows: Iterable[AssignmentRow], now: float | None = None) -> Changes:
        """Reconcile with the database's view; the database is the source of truth."""
        now = time.monotonic() if now is None else now
        changes = Changes()
        seen: set[int] = set()
        for row in rows:
            seen.add(row.partition)
            mine = self.owned.get(row.partition)
            if mine is not None and mine.epoch != row.epoch:
                # Same partition, new epoch: whatever we held under the old one is void.
                self.lose(row.partition, "epoch moved on")
                changes.lost.append(mine)
                mine = None
            if mine is None:
                mine = Owned(row.partition, row.epoch, "assigned")
                self.owned[row.partition] = mine
                changes.started.append(mine)
                log.info(
                    "partition %s assigned at epoch %s",
                    row.partition,
                    row.epoch,
                    extra={"action": "partition_assigned", **self.fields,
                           "partition": row.partition, "epoch": row.epoch},
                )  # fmt: skip
            if row.state == "revoking" and mine.state != "revoking":
                mine.state = "revoking"
                # Leave ourselves a margin: released before the leader forces it.
                mine.revoke_by = now + max((row.revoke_in or 0.0) - self.margin, 0.0)
                dropped = self.scheduler.drop_partition(row.partition, keep_busy=True)
                changes.revoked.append(mine)
                log.info(
                    "partition %s revoked, draining %s in flight",
                    row.partition,
                    self.scheduler.busy(row.partition),
                    extra={"action": "partition_revoking", **self.fields,
                           "partition": row.partition, "epoch": row.epoch,
                           "dropped": len(dropped)},
                )  # fmt: skip
            elif row.state == "assigned" and mine.state == "revoking":
                # The leader changed its mind (the target left): keep the partition. The
                # revoke dropped its buffered messages while their rows stay claimed under
                # this epoch, which the claim skips: adopt them again, or the key's later
                # messages overtake them.
                mine.state = "assigned"
                mine.revoke_by = None
                mine.adopted = False
                changes.resumed.append(mine)
        for partition in [p for p in self.owned if p not in seen]:
            owned = self.owned[partition]
            self.lose(partition, "no longer assigned to us")
            changes.lost.append(owned)
        return changes

    def lose(self, partition: int, reason: str) -> None:
        """Stop acting on a partition now: cancel its handlers, forget its messages."""
        owned = self.owned.pop(partition, None)
        if owned is None:
            return
        for scope in owned.scopes:
            scope.cancel()
        dropped = self.scheduler.drop_partition(partition)
        log.warning(
            "partition %s lost (%s)",
            partition,
            reason,
            extra={"action": "partition_lost", **self.fields, "partition": partition,
                   "epoch": owned.epoch, "reason": reason, "dropped": len(dropped),
                   "cancelled": len(owned.scopes)},
        )  # fmt: skip

    def lose_all(self, reason: str) -> None:
        for partition in list(self.owned):
            self.lose(partition, reason)

    def claimable(self) -> list[Owned]:
        return [o for o in self.owned.values() if o.state == "assigned"]

    def current(self, partition: int, epoch: int) -> Owned | None:
        owned = self.owned.get(partition)
        return owned if owned is not None and owned.epoch == epoch else None

    def releasable(self, now: float) -> list[Owned]:
        """Revoked partitions that are drained, or whose drain time is up."""
        ready = []
        for owned in self.owned.values():
            if owned.state != "revoking":
                continue
            if self.scheduler.busy(owned.partition) == 0:
                ready.append(owned)
            elif owned.revoke_by is not None and now >= owned.revoke_by:
                for scope in owned.scopes:
                    scope.cancel()
                log.warning(
                    "partition %s: drain deadline reached, cancelling %s handlers",
                    owned.partition,
                    len(owned.scopes),
                    extra={"action": "drain_deadline", **self.fields,
                           "partition": owned.partition, "epoch": owned.epoch},
                )  # fmt: skip
                ready.append(owned)
        return ready

    def next_revoke_deadline(self) -> float | None:
        deadlines = [o.revoke_by for o in self.owned.values() if o.revoke_by is not None]
        return min(deadlines) if deadlines else None
