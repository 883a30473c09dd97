"""Per-key FIFO over the messages a member holds. Pure bookkeeping: no I/O, no clock of its own.

Rules, which hold from what was read alone (so also right after a hand-off):
- A key's messages are handed out in the key's order (`Item.order`: its parked messages
  first, then its log messages by position), one at a time: the next only after the
  previous one is finished (its result committed).
- A key whose first message is not yet due (a short delay) is blocked as a whole; a later
  message of the same key never overtakes it.
- Different keys are independent: a failing or slow key blocks nobody else.
- A key can be taken out whole (it is being parked); a head handed out but not started
  (its start was refused) goes back to the front.
- Crash suspects (`Item.suspect`: charged because their consumer died while they ran) are
  handed out one at a time. A crash cannot say which running message caused it, so it
  charges all of them; run together again, a message that kills its process would take
  the healthy ones beside it to the dead letters with it. One at a time, the next crash
  is charged to the suspect that caused it (and to fresh messages running beside it,
  once: they become suspects in turn).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Iterable

from pgcg.consumer.message import Item


class _KeyQueue:
    __slots__ = ("busy", "items", "partition")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.items: deque[Item] = deque()
        self.busy = False  # its head is out: starting, with a handler, or being written

    def insert(self, item: Item) -> None:
        if not self.items or item.order > self.items[-1].order:
            self.items.append(item)
            return
        # An item that sorts earlier than what is buffered (a parked message loaded after
        # the key's log messages were read) goes in order, but never ahead of a head
        # already out.
        ordered = list(self.items)
        start = 1 if self.busy else 0
        orders = [c.order for c in ordered[start:]]
        ordered.insert(start + bisect.bisect_left(orders, item.order), item)
        self.items = deque(ordered)


class KeyScheduler:
    def __init__(self) -> None:
        self._keys: dict[str, _KeyQueue] = {}
        self._ready: dict[str, None] = {}  # idle keys whose head is due, oldest first
        self._held: dict[str, None] = {}  # idle keys whose due head is a suspect, waiting
        self._suspect_out = False  # a crash suspect is handed out (one at a time)
        self._timed: list[tuple[float, int, str]] = []  # (due, head uid, key) of blocked heads
        self._known: set[int] = set()
        self._buffered_by_partition: dict[int, int] = {}
        self._busy_by_partition: dict[int, int] = {}
        self._bytes = 0

    # -- adding ----------------------------------------------------------------------------

    def add(self, items: Iterable[Item], now: float) -> int:
        """Hold messages; ones already held are ignored. Returns how many were new."""
        added = 0
        for item in items:
            if item.uid in self._known:
                continue
            self._known.add(item.uid)
            self._bytes += item.size
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

    def holds(self, uid: int) -> bool:
        return uid in self._known

    def _schedule(self, key: str, queue: _KeyQueue, now: float) -> None:
        self._held.pop(key, None)
        head = queue.items[0]
        if head.due <= now:
            self._ready[key] = None
        else:
            self._ready.pop(key, None)
            heapq.heappush(self._timed, (head.due, head.uid, key))

    # -- handing out -----------------------------------------------------------------------

    def ready_count(self, now: float) -> int:
        """How many idle keys have a due head (what take() could hand out now, but for
        suspects held back by the one out)."""
        self._promote(now)
        return len(self._ready)

    def _promote(self, now: float) -> None:
        while self._timed and self._timed[0][0] <= now:
            _, head_uid, key = heapq.heappop(self._timed)
            queue = self._keys.get(key)
            # Stale heap entries (the head changed, the key went busy or was dropped) are
            # skipped rather than removed eagerly.
            if queue and not queue.busy and queue.items and queue.items[0].uid == head_uid:
                if queue.items[0].due <= now:
                    self._ready[key] = None
                else:
                    heapq.heappush(self._timed, (queue.items[0].due, head_uid, key))

    def take(self, now: float, limit: int) -> list[Item]:
        """Up to `limit` heads of idle keys that are due; their keys become busy."""
        self._promote(now)
        taken: list[Item] = []
        while self._ready and len(taken) < limit:
            key = next(iter(self._ready))
            del self._ready[key]
            queue = self._keys[key]
            if queue.items[0].suspect:
                self._held[key] = None  # suspects go one at a time: chosen below
                continue
            taken.append(self._hand_out(queue))
        if self._held and not self._suspect_out and len(taken) < limit:
            # The suspect charged least often first: one that crashes its consumer on
            # every delivery is charged at every crash, so after its first it goes last,
            # and healthy suspects wait one takeover at most.
            key = min(self._held, key=lambda k: self._keys[k].items[0].message.attempt)
            del self._held[key]
            self._suspect_out = True
            taken.append(self._hand_out(self._keys[key]))
        return taken

    def _hand_out(self, queue: _KeyQueue) -> Item:
        queue.busy = True
        head = queue.items[0]
        self._busy_by_partition[head.partition] = self._busy_by_partition.get(head.partition, 0) + 1
        return head

    def next_due(self) -> float | None:
        """When the earliest blocked head becomes due (monotonic), if any."""
        while self._timed:
            due, head_uid, key = self._timed[0]
            queue = self._keys.get(key)
            if queue and not queue.busy and queue.items and queue.items[0].uid == head_uid:
                return due
            heapq.heappop(self._timed)
        return None

    def has_ready(self) -> bool:
        return bool(self._ready)

    def _suspect_back(self, item: Item) -> None:
        """A suspect out finished, did not start or was dropped: the next may go."""
        if not item.suspect:
            return
        self._suspect_out = False
        # Held keys go back to the front, in the order they waited; take() holds again
        # all but the first suspect.
        waiting = {
            k: None for k in self._held if (q := self._keys.get(k)) and not q.busy and q.items
        }
        self._ready = {**waiting, **self._ready}
        self._held.clear()

    # -- results ---------------------------------------------------------------------------

    def finish(self, item: Item, now: float) -> None:
        """The head's result is committed: the key moves on to its next message."""
        queue = self._release(item)
        if queue is None:
            return
        queue.items.popleft()
        self._forget(item)
        if queue.items:
            self._schedule(item.key, queue, now)
        else:
            del self._keys[item.key]

    def unstart(self, item: Item, now: float) -> None:
        """The head was handed out but must not start (its start was refused, or it cannot
        start yet): the key is idle again with the same head."""
        queue = self._release(item)
        if queue is not None:
            # Messages that sort earlier may have arrived while it was out (they queued
            # behind it); it never started, so the key's order applies again.
            if any(a.order > b.order for a, b in itertools.pairwise(queue.items)):
                queue.items = deque(sorted(queue.items, key=lambda c: c.order))
            self._schedule(item.key, queue, now)

    def _release(self, item: Item) -> _KeyQueue | None:
        queue = self._keys.get(item.key)
        if queue is None or not queue.busy or not queue.items or queue.items[0] is not item:
            return None  # its partition or key was dropped meanwhile
        queue.busy = False
        self._busy_by_partition[item.partition] -= 1
        self._suspect_back(item)
        return queue

    def _forget(self, item: Item) -> None:
        self._known.discard(item.uid)
        self._bytes -= item.size
        self._buffered_by_partition[item.partition] -= 1

    # -- whole keys and partitions ---------------------------------------------------------

    def items_of(self, key: str) -> list[Item]:
        """The key's messages in memory, in the key's order (a busy head first)."""
        queue = self._keys.get(key)
        return list(queue.items) if queue is not None else []

    def busy_head(self, key: str) -> Item | None:
        queue = self._keys.get(key)
        return queue.items[0] if queue is not None and queue.busy and queue.items else None

    def drop_key(self, key: str, *, keep_busy: bool = True) -> list[Item]:
        """Forget a key's messages (it was parked: they come back from the parked queue).
        With keep_busy, a head that is out stays (its result is still to come)."""
        queue = self._keys.get(key)
        if queue is None:
            return []
        self._ready.pop(key, None)
        self._held.pop(key, None)
        if keep_busy and queue.busy:
            head = queue.items.popleft()
            dropped = list(queue.items)
            queue.items = deque([head])
        else:
            if queue.busy:
                self._busy_by_partition[queue.partition] -= 1
                self._suspect_back(queue.items[0])
            dropped = list(queue.items)
            del self._keys[key]
        for item in dropped:
            self._forget(item)
        return dropped

    def reidentify(self, item: Item, parked_id: int) -> None:
        """A busy log message was parked while it runs: from now on it is the parked one."""
        held = item.uid in self._known
        self._known.discard(item.uid)
        item.parked_id = parked_id
        if held:
            # Only what is held is known: a parked id known but not held would never be
            # loaded from the parked queue again.
            self._known.add(item.uid)

    def drop_partition(self, partition: int, *, keep_busy: bool = False) -> list[Item]:
        """Forget a partition's messages (revoked or lost). Returns what was dropped.

        With keep_busy, keys whose head is out stay until that head finishes (a revoked
        partition drains its in-flight work); their later messages are dropped.
        """
        dropped: list[Item] = []
        for key in [k for k, q in self._keys.items() if q.partition == partition]:
            dropped.extend(self.drop_key(key, keep_busy=keep_busy))
        return dropped

    def keys(self, partition: int) -> list[str]:
        return [k for k, q in self._keys.items() if q.partition == partition]

    def buffered(self, partition: int | None = None) -> int:
        if partition is None:
            return len(self._known)
        return self._buffered_by_partition.get(partition, 0)

    def buffered_bytes(self) -> int:
        return self._bytes

    def waiting_keys(self, now: float) -> list[tuple[float, str]]:
        """Idle keys whose head is not due yet, (due, key), latest first."""
        out = [
            (q.items[0].due, k)
            for k, q in self._keys.items()
            if not q.busy and q.items and q.items[0].due > now
        ]
        return sorted(out, reverse=True)

    def held_parked(self, partitions: Iterable[int]) -> list[int]:
        """Ids of the parked messages held for these partitions."""
        wanted = set(partitions)
        return [
            c.parked_id
            for q in self._keys.values()
            if q.partition in wanted
            for c in q.items
            if c.parked_id is not None
        ]

    def busy(self, partition: int | None = None) -> int:
        if partition is None:
            return sum(self._busy_by_partition.values())
        return self._busy_by_partition.get(partition, 0)
