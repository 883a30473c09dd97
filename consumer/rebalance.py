"""The application's rebalance callbacks: told which partitions this member was assigned,
has drained and is about to hand over (revoked), or lost without a hand-over.

`on_assigned` and `on_lost` run in a task of their own, in the order the changes
happened, so a slow callback never delays a heartbeat or a handler. `on_revoked` is
awaited after the partition's handlers finished and before its release is written: what
the callback flushes is done before the next owner starts (it is bounded by the drain
deadline). A callback that raises is logged and ignored: the consumer goes on.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from pgcg.shared.loops import Signal

log = logging.getLogger("pgcg.consumer")

# Called with the partitions, ascending; may be async. Keep a sync one quick: it runs on
# the event loop.
PartitionsCallback = Callable[[list[int]], Awaitable[None] | None]
Kind = Literal["assigned", "revoked", "lost"]


@dataclass(frozen=True, slots=True)
class Callbacks:
    on_assigned: PartitionsCallback | None = None
    on_revoked: PartitionsCallback | None = None
    on_lost: PartitionsCallback | None = None

    def __bool__(self) -> bool:
        return any((self.on_assigned, self.on_revoked, self.on_lost))

    def get(self, kind: Kind) -> PartitionsCallback | None:
        callback: PartitionsCallback | None = getattr(self, f"on_{kind}")
        return callback


async def invoke(
    callback: PartitionsCallback | None, kind: Kind, partitions: list[int], fields: dict[str, Any]
) -> None:
    """Run one callback; its exception is logged, never raised."""
    if callback is None or not partitions:
        return
    try:
        result = callback(sorted(partitions))
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception(
            "on_%s callback failed for partitions %s; the consumer goes on",
            kind,
            sorted(partitions),
            extra={"action": "rebalance_callback_failed", **fields, "callback": f"on_{kind}"},
        )


class Events:
    """Assignments and losses as they happen (from synchronous code), delivered in order
    by `run()`; consecutive changes of one kind go to one call."""

    def __init__(self, callbacks: Callbacks, fields: Callable[[], dict[str, Any]]) -> None:
        self.callbacks = callbacks
        self._fields = fields
        self._queue: deque[tuple[Kind, int]] = deque()
        self._signal = Signal()

    def add(self, kind: Kind, partition: int) -> None:
        if self.callbacks.get(kind) is None:
            return
        self._queue.append((kind, partition))
        self._signal.set()

    async def run(self) -> None:
        while True:
            await self._signal.wait()
            while self._queue:
                kind, first = self._queue.popleft()
                partitions = [first]
                while self._queue and self._queue[0][0] == kind:
                    partitions.append(self._queue.popleft()[1])
                await invoke(self.callbacks.get(kind), kind, partitions, self._fields())

    async def revoked(self, partitions: list[int], deadline: float) -> None:
        """on_revoked, awaited, for at most `deadline` seconds (the release must go out)."""
        callback = self.callbacks.on_revoked
        if callback is None or not partitions:
            return
        with anyio.move_on_after(deadline) as scope:
            await invoke(callback, "revoked", partitions, self._fields())
        if scope.cancelled_caught:
            log.warning(
                "on_revoked callback still running after %gs: releasing partitions %s anyway",
                deadline,
                sorted(partitions),
                extra={"action": "rebalance_callback_timeout", **self._fields()},
            )
