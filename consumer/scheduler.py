"""Per-key FIFO over claimed messages. Pure bookkeeping: no I/O, no clock of its own.

Rules, which hold from the claimed rows alone (so also right after a hand-off):
- A key's messages are handed out in id order, one at a time: the next only after the
  previous one is finished (acked or dead-lettered).
- A key whose oldest message is not yet due (waiting for a retry) is blocked as a whole;
  a later message of the same key never overtakes it.
- Different keys are independent: a failing or slow key blocks nobody else.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterable

from pgcg.consumer.message import Claimed


class _KeyQueue:
    __slots__ = ("busy", "items", "partition")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.items: deque[Claimed] = deque()
        self.busy = False  # its head is with a handler or waiting for its ack

    def insert(self, item: Claimed) -> None:
        if not self.items or item.id > self.items[-1].id:
            self.items.append(item)
            return
        # A late commit or a replayed dead letter arrives with a lower id than what is
        # buffered: it goes in id order, but never ahead of a head already being handled.
        ordered = list(self.items)
        start = 1 if self.busy else 0
        ids = [c.id for c in ordered[start:]]
        ordered.insert(start + bisect.bisect_left(ids, item.id), item)
        self.items = deque(ordered)


class KeyScheduler:
    def __init__(self) -> None:
        self._keys: dict[str, _KeyQueue] = {}
        self._ready: dict[str, None] = {}  # idle keys whose head is due, oldest first
        self._timed: list[tuple[float, int, str]] = []  # (due, head id, key) of blocked heads
        self._known: set[int] = set()
        self._buffered_by_partition: dict[int, int] = {}
        self._busy_by_partition: dict[int, int] = {}
        # Keys whose head waits for its time and whose later messages went back to the
        # table (see trim_waiting); the fetcher does not claim them until the head is done.
        self._held: dict[str, int] = {}  # key -> partition
        self.held_released = False  # a held key moved on: its later messages are claimable

    # -- adding --------------------------------------------------------------------------

    def add(self, items: Iterable[Claimed], now: float) -> int:
        """Buffer claimed messages; ids already known are ignored. Returns how many were new."""
        added = 0
        for item in items:
            if item.id in self._known:
                continue
            self._known.add(item.id)
            queue = self._keys.get(item.key)
            if queue is None:
                queue = self._keys[item.key] = _KeyQueue(item.partition)
            queue.insert(item)
            self._buffered_by_partition[item.partition] = (
                self._buffered_by_partition.get(item.partition, 0) + 1
            )
            added += 1
            if not queue.busy and queue.items[0] is item:
                self._schedule(item.key, queue, now)
        return added

    def _schedule(self, key: str, queue: _KeyQueue, now: float) -> None:
        head = queue.items[0]
        if head.due <= now:
            self._ready[key] = None
        else:
            self._ready.pop(key, None)
            heapq.heappush(self._timed, (head.due, head.id, key))

    # -- handing out -----------------------------------------------------------------------

    def ready_count(self, now: float) -> int:
        """How many idle keys have a due head (what take() could hand out now)."""
        self._promote(now)
        return len(self._ready)

    def _promote(self, now: float) -> None:
        while self._timed and self._timed[0][0] <= now:
            _, head_id, key = heapq.heappop(self._timed)
            queue = self._keys.get(key)
            # Stale heap entries (the head changed, the key went busy or was dropped) are
            # skipped rather than removed eagerly.
            if queue and not queue.busy and queue.items and queue.items[0].id == head_id:
                if queue.items[0].due <= now:
                    self._ready[key] = None
                else:
                    heapq.heappush(self._timed, (queue.items[0].due, head_id, key))

    def take(self, now: float, limit: int) -> list[Claimed]:
        """Up to `limit` heads of idle keys that are due; their keys become busy."""
        self._promote(now)
        taken: list[Claimed] = []
        while self._ready and len(taken) < limit:
            key = next(iter(self._ready))
            del self._ready[key]
            queue = self._keys[key]
            queue.busy = True
            head = queue.items[0]
            self._busy_by_partition[head.partition] = (
                self._busy_by_partition.get(head.partition, 0) + 1
            )
            taken.append(head)
        return taken

    def next_due(self) -> float | None:
        """When the earliest blocked head becomes due (monotonic), if any."""
        while self._timed:
            due, head_id, key = self._timed[0]
            queue = self._keys.get(key)
            if queue and not queue.busy and queue.items and queue.items[0].id == head_id:
                return due
            heapq.heappop(self._timed)
        return None

    def has_ready(self) -> bool:
        return bool(self._ready)

    # -- results ---------------------------------------------------------------------------

    def finish(self, item: Claimed, now: float) -> None:
        """The head was acked or dead-lettered: the key moves on to its next message."""
        queue = self._release(item)
        if queue is None:
            return
        queue.items.popleft()
        self._known.discard(item.id)
        self._buffered_by_partition[item.partition] -= 1
        if self._held.pop(item.key, None) is not None:
            self.held_released = True
        if queue.items:
            self._schedule(item.key, queue, now)
        else:
            del self._keys[item.key]

    def defer(self, item: Claimed, due: float, now: float) -> None:
        """The head failed and will be retried at `due`; the whole key waits for it.

        Its next delivery is the next attempt, as the failure recorded in the database
        says: a retry handed out from memory must not repeat attempt 1 forever (it would
        never reach max_attempts and never be dead-lettered).
        """
        queue = self._release(item)
        if queue is None:
            return
        item.due = due
        if len(queue.items) > 1 and queue.items[1].id < item.id:
            # A lower id arrived while this head was being handled and had to queue behind
            # it. The head is no longer in flight, so the key is back to plain id order:
            # the order a new owner reading the rows would see, and the one insert() gives
            # a lower id that arrives while the head waits for its retry.
            queue.items = deque(sorted(queue.items, key=lambda c: c.id))
        self._schedule(item.key, queue, now)

    def _release(self, item: Claimed) -> _KeyQueue | None:
        queue = self._keys.get(item.key)
        if queue is None or not queue.busy or not queue.items or queue.items[0] is not item:
            return None  # its partition was dropped meanwhile
        queue.busy = False
        self._busy_by_partition[item.partition] -= 1
        return queue

    def trim_waiting(self, now: float) -> list[Claimed]:
        """Keys whose head is not due (a retry, a delay) keep only that head in memory.

        Their later messages cannot move before the head anyway; kept in memory they would
        fill the prefetch window and starve every other key. Returns the dropped messages,
        which the caller puts back in the table; `held_keys()` names the keys the next
        claims must skip until the head is done.
        """
        trimmed: list[Claimed] = []
        for _, head_id, key in self._timed:
            queue = self._keys.get(key)
            if (
                queue is None
                or queue.busy
                or not queue.items
                or queue.items[0].id != head_id
                or queue.items[0].due <= now
            ):
                continue
            self._held[key] = queue.partition
            if len(queue.items) > 1:
                head = queue.items.popleft()
                tail = list(queue.items)
                queue.items = deque([head])
                for item in tail:
                    self._known.discard(item.id)
                self._buffered_by_partition[queue.partition] -= len(tail)
                trimmed.extend(tail)
        return trimmed

    def held_keys(self) -> list[str]:
        return list(self._held)

    # -- partitions ------------------------------------------------------------------------

    def drop_partition(self, partition: int, *, keep_busy: bool = False) -> list[Claimed]:
        """Forget a partition's buffered messages (revoked or lost). Returns what was dropped.

        With keep_busy, keys whose head is being handled stay until that head finishes
        (a revoked partition drains its in-flight work); their later messages are dropped.
        """
        dropped: list[Claimed] = []
        for key in [k for k, q in self._keys.items() if q.partition == partition]:
            queue = self._keys[key]
            self._ready.pop(key, None)
            if keep_busy and queue.busy:
                head = queue.items.popleft()
                dropped.extend(queue.items)
                queue.items = deque([head])
                continue
            if queue.busy:
                self._busy_by_partition[partition] -= 1
            dropped.extend(queue.items)
            del self._keys[key]
        for item in dropped:
            self._known.discard(item.id)
        for key in [k for k, p in self._held.items() if p == partition]:
            del self._held[key]
        self._buffered_by_partition[partition] = self._buffered_by_partition.get(
            partition, 0
        ) - len(dropped)
        return dropped

    def buffered(self, partition: int | None = None) -> int:
        if partition is None:
            return len(self._known)
        return self._buffered_by_partition.get(partition, 0)

    def held(self, partition: int) -> list[int]:
        """Ids of a partition's messages in memory: buffered, being handled, or waiting
        for their result to be written."""
        return [c.id for q in self._keys.values() if q.partition == partition for c in q.items]

    def busy(self, partition: int | None = None) -> int:
        if partition is None:
            return sum(self._busy_by_partition.values())
        return self._busy_by_partition.get(partition, 0)
