"""What this member owns, as last read from partition_assignments, and the transitions:
started, revoked (drain, then release) and lost (stop at once).

Each transition is also a span: `pgcg partition assign` and `pgcg partition lost` are
instants; `pgcg partition revoke` lasts from the revocation to the release (the drain
time), and records how it ended. Their log records carry the span's trace id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from opentelemetry import trace

from pgcg.consumer.member import AssignmentRow
from pgcg.consumer.message import Item
from pgcg.consumer.scheduler import KeyScheduler
from pgcg.shared import tracing

log = logging.getLogger("pgcg.consumer.assignment")

# The exit code of a consumer that stopped because a handler thread outlived its partition.
EXIT_HANDLER_STUCK = 6


def halt(owned: Owned, reason: str) -> None:
    """Stop the process: a handler still works on a partition that has to be let go
    (drain deadline, lease expiry, shutdown, or it was already taken from us), and cannot
    be stopped: a `def` handler's thread, or an async handler that ignores cancellation.

    Releasing the partition (or letting the lease run out) while it runs would give its
    keys to a second member while this one still works on them. Exiting now, before the
    lease ends, takes the handler down with the process; the supervisor restarts it, and
    the next owner takes over after the session timeout.
    """
    log.critical(
        "partition %s: a handler is still running after %s and cannot be stopped; "
        "exiting (code %s) so that no other member works on its keys while it does",
        owned.partition,
        reason,
        EXIT_HANDLER_STUCK,
        extra={"action": "handler_thread_stuck", "partition": owned.partition,
               "epoch": owned.epoch, "reason": reason, "threads": owned.threads},
    )  # fmt: skip
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_HANDLER_STUCK)


@dataclass(eq=False)
class Owned:
    partition: int
    epoch: int
    state: str  # assigned | revoking
    adopted: bool = False  # the group's state here was read back (see adopt)
    revoke_by: float | None = None  # monotonic: cancel in-flight work and release by then
    scopes: set[anyio.CancelScope] = field(default_factory=set)
    # Set once its handlers were cancelled (partition lost, drain time up): a cancelled
    # handler then writes no result, where one cancelled by its own deadline is stuck.
    handlers_cancelled: bool = False
    # Plain `def` handlers of this partition running in worker threads now: cancelling
    # does not stop a thread, so while one runs the partition must not be let go.
    threads: int = 0

    def cancel_handlers(self) -> None:
        self.handlers_cancelled = True
        for scope in self.scopes:
            scope.cancel()

    revoke_span: trace.Span | None = None  # open from the revocation to the release

    # What the member read and finished here (set by adopt; see reader.py).
    gen: int = 0  # the group's seek generation
    done: int = 0  # every batch up to this tick has been read
    cur: int | None = None  # the batch being read (the one after `done`)...
    cur_offset: int | None = None  # ...and the last offset read in it
    finished: set[int] = field(default_factory=set)  # offsets finished above the position
    unfinished: dict[int, int] = field(default_factory=dict)  # batch (its a_tick) -> count
    saved: int = 0  # the position last written
    blocked_since: tuple[int, float] | None = None  # (position, monotonic) while it holds
    # Keys with messages in the group's parked queue (as far as this member knows), and
    # the writer round after which a fetch sees each of our own parks.
    parked_keys: set[str] = field(default_factory=set)
    recent_parks: dict[str, int] = field(default_factory=dict)
    # False once something of this epoch may still be running after we let go (handlers
    # cancelled at a drain deadline, threads that would not stop): the next owner charges.
    clean: bool = True

    def position(self) -> int:
        """The tick up to which every batch of this partition is finished."""
        # Never past the cursor: messages held across a revocation called off are counted
        # when the partition is read back, and may belong to batches after the ones the
        # revocation dropped, which the cursor has yet to read again.
        return min([self.done, *(a for a, n in self.unfinished.items() if n > 0)])

    def read_log(self, item: Item) -> None:
        """A log message of batch `item.a_tick` is held: the position waits for it."""
        assert item.a_tick is not None
        self.unfinished[item.a_tick] = self.unfinished.get(item.a_tick, 0) + 1

    def finished_log(self, item: Item) -> None:
        """A log message is done with (handled, dead-lettered or parked): its result
        committed."""
        if not item.parked and not self._passed(item):
            # A read may still list it: one in flight now, or the cursor's pass over what
            # was held in memory across an adopt, whose reading of the group's finished
            # messages came before this. Skipped then, like those the adopt found.
            self.finished.add(item.offset)
        if item.a_tick is None:
            return
        left = self.unfinished.get(item.a_tick, 0) - 1
        if left > 0:
            self.unfinished[item.a_tick] = left
        else:
            self.unfinished.pop(item.a_tick, None)
        item.a_tick = None

    def _passed(self, item: Item) -> bool:
        """Whether the reading cursor is past `item` (no read of this holding lists it
        again). Not adopted yet: the adopt's reading may already be on its way."""
        if not self.adopted:
            return False
        if item.tick <= self.done:
            return True
        return (
            self.cur is not None
            and self.cur_offset is not None
            and (item.tick, item.offset) <= (self.cur, self.cur_offset)
        )

    def parked_left(self, key: str, remaining: int | None) -> None:
        """A parked message of `key` finished; `remaining` of the key are still parked."""
        if remaining == 0:
            self.parked_keys.discard(key)

    def reset_reading(self) -> None:
        """Back to the durable position: the next adopt reads state back from there."""
        self.adopted = False
        self.cur = self.cur_offset = None
        self.unfinished.clear()
        self.finished.clear()
        self.blocked_since = None


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
        self,
        scheduler: KeyScheduler,
        fields: dict[str, Any] | Callable[[], dict[str, Any]],
        margin: float,
    ) -> None:
        self.scheduler = scheduler
        self._fields = fields
        self.margin = margin
        self.owned: dict[int, Owned] = {}
        self._handing_off: set[int] = set()  # our release of these is in flight
        # Holdings let go while their cancelled handlers had not returned yet: a handler
        # that swallows the cancellation still hands in a result (see settling).
        self._cut_off: list[Owned] = []
        # Told of each partition assigned or lost (the application's callbacks).
        self.notify: Callable[[Literal["assigned", "lost"], int], None] | None = None
        # Called when a partition must be let go while a handler thread still works on it
        # (see halt): nothing can stop the thread, so the process has to stop.
        self.on_stuck: Callable[[Owned, str], None] = halt

    @property
    def fields(self) -> dict[str, Any]:
        """group, member_id, topic for log records (the member id changes on rejoin)."""
        return self._fields() if callable(self._fields) else self._fields

    def apply(self, rows: Iterable[AssignmentRow], now: float | None = None) -> Changes:
        """Reconcile with the database's view; the database is the source of truth.

        `now` is when the rows were asked for: the revocation deadlines they carry count
        from the database's clock at that moment, and an answer that arrives late must
        not move them later.
        """
        now = time.monotonic() if now is None else now
        changes = Changes()
        seen: set[int] = set()
        for row in rows:
            seen.add(row.partition)
            if row.partition in self._handing_off:
                continue  # our own release decides; the next heartbeat sees the result
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
                if self.notify is not None:
                    self.notify("assigned", row.partition)
                with tracing.event_span(
                    "pgcg partition assign", self.fields, **_partition(row.partition, row.epoch)
                ):
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
                in_flight = self.scheduler.busy(row.partition)
                mine.revoke_span = tracing.start_span(
                    "pgcg partition revoke",
                    self.fields,
                    **_partition(row.partition, row.epoch),
                    **{"pgcg.in_flight": in_flight, "pgcg.dropped": len(dropped),
                       "pgcg.drain_deadline_s": row.revoke_in},
                )  # fmt: skip
                with _current(mine.revoke_span):
                    log.info(
                        "partition %s revoked, draining %s in flight",
                        row.partition,
                        in_flight,
                        extra={"action": "partition_revoking", **self.fields,
                               "partition": row.partition, "epoch": row.epoch,
                               "dropped": len(dropped)},
                    )  # fmt: skip
            elif row.state == "assigned" and mine.state == "revoking":
                # The leader changed its mind (the target left): keep the partition. The
                # revoke dropped its buffered messages: read again from the durable
                # position (adopt tells what was finished), or the reader's cursor would
                # have passed messages no longer held.
                mine.state = "assigned"
                mine.revoke_by = None
                mine.reset_reading()
                changes.resumed.append(mine)
                _end_revoke(mine, "resumed")
        for partition in [p for p in self.owned if p not in seen | self._handing_off]:
            owned = self.owned[partition]
            self.lose(partition, "no longer assigned to us")
            changes.lost.append(owned)
        return changes

    def lose(self, partition: int, reason: str) -> None:
        """Stop acting on a partition now: cancel its handlers, forget its messages."""
        owned = self.owned.pop(partition, None)
        if owned is None:
            return
        owned.cancel_handlers()
        if owned.threads:
            self.on_stuck(owned, reason)
        if owned.scopes:
            self._cut_off.append(owned)
        dropped = self.scheduler.drop_partition(partition)
        for item in dropped:
            item.void = True
        _end_revoke(owned, "lost", reason)
        if self.notify is not None:
            self.notify("lost", partition)
        with tracing.event_span(
            "pgcg partition lost",
            self.fields,
            **_partition(partition, owned.epoch),
            **{"pgcg.reason": reason, "pgcg.dropped": len(dropped),
               "pgcg.cancelled": len(owned.scopes)},
        ) as span:  # fmt: skip
            span.set_status(trace.Status(trace.StatusCode.ERROR, reason))
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

    def settling(self, partition: int) -> bool:
        """Whether handlers of `partition` that started before it was (re)started may still
        finish: cancelled ones of a holding let go that have not returned yet, or heads
        still running from before a revocation was called off. Their results would land
        after the partition is read back (see Reader: it waits)."""
        self._cut_off = [o for o in self._cut_off if o.scopes]
        if any(o.partition == partition for o in self._cut_off):
            return True
        return any(
            head is not None and not head.parked
            for head in map(self.scheduler.busy_head, self.scheduler.keys(partition))
        )

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
                if owned.revoke_span is not None:
                    owned.revoke_span.add_event(
                        "drain deadline reached", {"pgcg.cancelled": len(owned.scopes)}
                    )
                owned.cancel_handlers()
                log.warning(
                    "partition %s: drain deadline reached, cancelling %s handlers",
                    owned.partition,
                    len(owned.scopes),
                    extra={"action": "drain_deadline", **self.fields,
                           "partition": owned.partition, "epoch": owned.epoch},
                )  # fmt: skip
                if owned.threads:
                    self.on_stuck(owned, "drain deadline reached")
                elif owned.scopes and now >= owned.revoke_by + self.margin / 2:
                    # Cancelled, and still running half a margin later: an async handler
                    # that ignores cancellation. The leader forces the hand-off a margin
                    # after revoke_by; this process must be gone by then.
                    self.on_stuck(owned, "drain deadline reached (cancellation ignored)")
                # Released once its cancelled handlers have really returned.
                if not owned.scopes:
                    ready.append(owned)
        return ready

    def next_revoke_deadline(self) -> float | None:
        deadlines = [o.revoke_by for o in self.owned.values() if o.revoke_by is not None]
        return min(deadlines) if deadlines else None

    @contextlib.contextmanager
    def handing_off(self, parts: Iterable[Owned]) -> Iterator[None]:
        """Around our release statement: a heartbeat that reads the assignments meanwhile
        must not take the partitions' disappearance for a loss (a false `partition_lost`
        warning, and a revocation recorded as lost although it was handed over)."""
        partitions = {p.partition for p in parts}
        self._handing_off |= partitions
        try:
            yield
        finally:
            self._handing_off -= partitions

    @contextlib.contextmanager
    def releasing(
        self, part: Owned, row: dict[str, Any] | None, reason: str
    ) -> Iterator[trace.Span]:
        """Around the record of one partition's release: ends its revoke span with the
        outcome, or (a release on shutdown) is a `pgcg partition release` span itself."""
        outcome = {
            "pgcg.reason": reason,
            "pgcg.to_member": (row or {}).get("new_owner"),
            "pgcg.new_epoch": (row or {}).get("epoch"),
            "pgcg.fenced": row is None,
        }
        span = part.revoke_span
        if span is None:
            with tracing.event_span(
                "pgcg partition release",
                self.fields,
                **_partition(part.partition, part.epoch),
                **outcome,
            ) as span:
                yield span
            return
        with _current(span):
            yield span
        _end_revoke(part, "released", **outcome)


def _partition(partition: int, epoch: int) -> dict[str, Any]:
    return {tracing.PARTITION: str(partition), "pgcg.epoch": epoch}


def _current(span: trace.Span | None) -> contextlib.AbstractContextManager[Any]:
    if span is None or not span.is_recording():
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False, record_exception=False)


def _end_revoke(owned: Owned, outcome: str, reason: str | None = None, **attributes: Any) -> None:
    span, owned.revoke_span = owned.revoke_span, None
    if span is None:
        return
    if span.is_recording():
        span.set_attributes(
            {k: v for k, v in {"pgcg.outcome": outcome, **attributes}.items() if v is not None}
        )
        if outcome == "lost":
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"lost: {reason}"))
    span.end()
