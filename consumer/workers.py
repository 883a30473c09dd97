"""Handler workers: up to `concurrency` long-lived tasks that run the handler on messages the
writer cleared to start (their mark or claim committed), and hand each result back to it.

Not a task per message: starting an anyio task cost 47 us of CPU, and a cancel scope
with a deadline timer 8 us, against well under 1 us for a no-op handler. A worker lives
until shutdown; when nothing is ready it waits on its own Event until the dispatcher
wakes it, and more workers are started only while every one is busy.

Cancellation: a worker's CancelScope is in its partition's `Owned.scopes` only while it
runs a handler of that partition, so `cancel_handlers()` reaches exactly those handlers;
the worker then writes no result, opens a new scope and goes on. Each delivery also runs
under its own deadline (progress.py): past the visibility timeout without a progress
report the handler is stuck, cancelled, and its result is a failure.

Transactional handlers (`handle(message, tx)`) write their own completion in the handler's
transaction (transactional.py); a fenced one raises LostOwnership and the partition is
dropped here, with no result for the writer.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from pgcg.consumer.assignment import Owned
from pgcg.consumer.context import Context
from pgcg.consumer.message import Item, Message
from pgcg.consumer.progress import Progress
from pgcg.consumer.transactional import Transactional
from pgcg.consumer.writer import MAX_ERROR_TEXT, Result
from pgcg.shared.errors import LostOwnership

log = logging.getLogger("pgcg.consumer")

YIELD_EVERY = 16  # messages a worker handles back to back before it yields to the others


@dataclass(eq=False)
class _Worker:
    scope: anyio.CancelScope | None = None
    item: Item | None = None  # the message whose handler runs now
    owned: Owned | None = None
    handled: int = 0


class Workers:
    def __init__(
        self,
        ctx: Context,
        call: Callable[[Message], Awaitable[None]],
        submit: Callable[[Result], None],
        progress: Progress,
        transactional: Transactional | None = None,
    ) -> None:
        self.ctx = ctx
        self._call = call
        self._submit = submit
        self._progress = progress
        self._transactional = transactional
        self._workers: set[_Worker] = set()
        self._idle: list[anyio.Event] = []
        self._starting = 0
        self._cleared: deque[Item] = deque()
        self.pending = 0  # handed to the writer to be marked or claimed
        self._tg: TaskGroup | None = None

    @property
    def size(self) -> int:
        return len(self._workers) + self._starting

    @property
    def free(self) -> int:
        """How many more messages may be started now (running, cleared and starting count)."""
        return self.ctx.settings.concurrency - self.ctx.running - len(self._cleared) - self.pending

    def submit(self, items: list[Item], answered: int) -> None:
        """Messages cleared to start: wake an idle worker for each, or start workers, up to
        `concurrency`. `answered`: how many of the starts handed to the writer it answered,
        `items` among them; the others may not start (their partition went), and must not
        hold a place either, or the consumer would end up starting nothing at all."""
        self.pending = max(0, self.pending - answered)
        self._cleared.extend(items)
        self.wake()

    def wake(self) -> None:
        wanted = len(self._cleared)
        while wanted > 0 and self._idle:
            self._idle.pop().set()
            wanted -= 1
        while wanted > 0 and self.size < self.ctx.settings.concurrency and self._tg is not None:
            self._starting += 1
            self._tg.start_soon(self._run)
            wanted -= 1

    def _next_ready(self, now: float) -> tuple[Item, Owned] | None:
        """A cleared message whose partition we still hold (assigned); None if none."""
        ctx = self.ctx
        while self._cleared:
            item = self._cleared.popleft()
            owned = ctx.assignment.current(item.partition, item.epoch)
            if (
                owned is not None
                and not item.void
                and owned.state == "assigned"
                and not ctx.stopping
                and ctx.membership.lease.valid(now)
            ):
                return item, owned
            # Not ours to start any more (revoked, lost, stopping, lease gone): the key is
            # idle again, its message the next owner's or the next start's.
            ctx.scheduler.unstart(item, now)
        return None

    async def _run(self) -> None:
        self._starting -= 1
        worker = _Worker()
        self._workers.add(worker)
        try:
            while True:
                with anyio.CancelScope() as worker.scope:
                    await self._work(worker)
                self._cancelled(worker)
        finally:
            self._workers.discard(worker)
            if worker.item is not None:
                self._end(worker)

    async def _work(self, worker: _Worker) -> None:
        while True:
            ready = self._next_ready(time.monotonic())
            if ready is None:
                idle = anyio.Event()
                self._idle.append(idle)
                await idle.wait()
                continue
            item, owned = ready
            self._begin(worker, item, owned)
            error: str | None = None
            settled = False  # transactional: acked in the handler's transaction, or fenced
            fenced = False
            # The deadline moves with each progress report; past it the handler is stuck.
            delivery = self._progress.start(item)
            try:
                with delivery.deadline:
                    if self._transactional is None:
                        await self._call(delivery.message)
                    else:
                        await self._transactional.handle(item, delivery.message)
                        settled = True
                if delivery.deadline.cancelled_caught:
                    error = self._progress.stuck(delivery)
            except LostOwnership:
                settled = fenced = True
            except Exception as exc:
                error = "".join(traceback.format_exception_only(exc)).strip()[:MAX_ERROR_TEXT]
                log.debug("handler failed", exc_info=True, extra={"action": "handler_failed"})
            finally:
                self._progress.end(item)
            self._end(worker)
            if fenced and self.ctx.assignment.current(item.partition, item.epoch) is not None:
                # Rolled back by the epoch fence: the partition's other handlers stop too
                # (after _end, so this worker's own scope is not among those cancelled).
                self.ctx.assignment.lose(item.partition, "ack rejected by the epoch fence")
            if not settled:
                self._submit(Result(item, error))
            # A handler that never awaits must not starve the fetcher, the acker and the
            # heartbeat: yield every few messages (a checkpoint per message was 8 % of a
            # no-op consumer's CPU; the acker batches what piles up meanwhile).
            worker.handled += 1
            if worker.handled % YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()

    def _begin(self, worker: _Worker, item: Item, owned: Owned) -> None:
        assert worker.scope is not None
        worker.item, worker.owned = item, owned
        owned.scopes.add(worker.scope)
        self.ctx.running += 1

    def _end(self, worker: _Worker) -> None:
        assert worker.owned is not None and worker.scope is not None
        worker.owned.scopes.discard(worker.scope)
        worker.item = worker.owned = None
        self.ctx.running -= 1

    def _cancelled(self, worker: _Worker) -> None:
        """The worker's scope was cancelled while its handler ran: the partition went (no
        result to write)."""
        if worker.item is None or worker.owned is None:
            return  # the handler swallowed the cancellation and finished normally
        self._end(worker)
