"""Handler workers: up to `concurrency` long-lived tasks that run the handler on messages the
writer cleared to start (their mark or claim committed), and hand each result back to it.

Not a task per message: starting an anyio task cost 47 us of CPU, and a cancel scope
with a deadline timer 8 us (so deadlines have one watchdog, progress.py), against well
under 1 us for a no-op handler. A worker lives
until shutdown; when nothing is ready it waits on its own Event until the dispatcher
wakes it, and more workers are started only while every one is busy.

Cancellation: a worker's CancelScope is in its partition's `Owned.scopes` only while it
runs a handler of that partition, so `cancel_handlers()` reaches exactly those handlers;
the worker then writes no result, opens a new scope and goes on. Each delivery also has a
deadline (progress.py): past the visibility timeout without a progress report the handler
is stuck, and the watchdog cancels the same scope, marking the delivery stuck; its result
is then a failure.

Transactional handlers (`handle(message, tx)`) write their own completion in the handler's
transaction (transactional.py); a fenced one raises LostOwnership and the partition is
dropped here, with no result for the writer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from pgcg.consumer.assignment import Owned
from pgcg.consumer.context import Context
from pgcg.consumer.message import Item, Message
from pgcg.consumer.outcomes import describe
from pgcg.consumer.payloads import decode
from pgcg.consumer.progress import Delivery, Progress
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
    delivery: Delivery | None = None  # its deadline and progress
    handled: int = 0
    # Set to wake the worker when it ran out of work. One per worker, cleared before each
    # wait: a fresh event per wait took a lock the first time it was awaited (asyncio binds
    # an event to its loop then), about once a message, 7 % of a no-op consumer's CPU. The
    # consumer runs on asyncio alone (psycopg's async connections do).
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class Workers:
    def __init__(
        self,
        ctx: Context,
        call: Callable[[Message], Awaitable[None]],
        submit: Callable[[Result], None],
        progress: Progress,
        transactional: Transactional | None = None,
        payload_type: Any = None,
        *,
        threaded: bool = False,
    ) -> None:
        self.ctx = ctx
        self._payload_type = payload_type  # what the handler declares (Message[Order])
        # Plain `def` handlers run in worker threads, which cancellation cannot stop: each
        # running one is counted on its partition (Owned.threads), which is held meanwhile.
        self._threaded = threaded
        self._call = call
        self._submit = submit
        self._progress = progress
        self._transactional = transactional
        self._workers: set[_Worker] = set()
        self._idle: list[asyncio.Event] = []  # workers waiting for work
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
            idle = self._idle.pop()
            if idle.is_set():
                continue  # listed twice (its worker was cancelled while it waited): woken
            idle.set()
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
        assert worker.scope is not None
        while True:
            if worker.scope.cancel_called:
                # Cancelled while a handler ran, which swallowed it and returned: the next
                # message must not start in a cancelled scope (it would be cancelled at its
                # first await, with no result). _run opens a new one.
                return
            ready = self._next_ready(time.monotonic())
            if ready is None:
                worker.idle.clear()
                self._idle.append(worker.idle)
                await worker.idle.wait()
                continue
            item, owned = ready
            self._begin(worker, item, owned)
            result: Result | None = None
            fenced = False
            # The deadline moves with each progress report; past it the handler is stuck,
            # and the watchdog cancels the worker's scope (see _cancelled).
            delivery = worker.delivery = self._progress.start(item, worker.scope)
            if self._threaded:
                owned.threads += 1
            try:
                message = delivery.message
                if self._payload_type is not None:
                    # Raises PayloadValidationError, a DeadLetter: never retried.
                    message = replace(message, payload=decode(message.payload, self._payload_type))
                if self._transactional is None:
                    await self._call(message)
                    result = Result(item)
                else:
                    # Acked in the handler's own transaction: no result to write.
                    await self._transactional.handle(item, message)
            except LostOwnership:
                fenced = True
            except Exception as exc:
                result = self._failed(item, exc)
            finally:
                if self._threaded:
                    owned.threads -= 1
                self._progress.end(delivery)
            self._end(worker)
            if fenced and self.ctx.assignment.current(item.partition, item.epoch) is not None:
                # Rolled back by the epoch fence: the partition's other handlers stop too
                # (after _end, so this worker's own scope is not among those cancelled).
                self.ctx.assignment.lose(item.partition, "ack rejected by the epoch fence")
            # A slot is free: the head of another key may start now. Woken before the
            # writer, the dispatcher hands its start over in time for it to go in the same
            # round as this result; woken by the result's commit, as before, each start of
            # a consumer with few handlers waited for two round trips.
            self.ctx.wake.dispatch.set()
            if result is not None:
                self._submit(result)
            # A handler that never awaits must not starve the fetcher, the acker and the
            # heartbeat: yield every few messages (a checkpoint per message was 8 % of a
            # no-op consumer's CPU; the acker batches what piles up meanwhile).
            worker.handled += 1
            if worker.handled % YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()

    def _failed(self, item: Item, exc: Exception) -> Result:
        """The handler's exception judged by its policy: retry (after Retry's delay or the
        backoff), or dead-letter now (DeadLetter, an invalid payload, dead_letter_on, an
        exception outside retry_on, the last attempt)."""
        log.debug("handler failed", exc_info=exc, extra={"action": "handler_failed"})
        try:
            decided = self.ctx.retry.outcome(exc, item.message.attempt)
        except ValueError as broken:  # the handler's backoff gave no usable delay
            log.error("%s; retrying in %gs", broken, self.ctx.settings.retry_max,
                      extra={"action": "backoff_failed", **self.ctx.fields})  # fmt: skip
            return Result(item, describe(exc)[:MAX_ERROR_TEXT],
                          retry_after=self.ctx.settings.retry_max)  # fmt: skip
        reason = decided.reason[:MAX_ERROR_TEXT]
        if decided.dead_lettered:
            return Result(item, reason, dead=True)
        return Result(item, reason, retry_after=decided.delay)

    def _begin(self, worker: _Worker, item: Item, owned: Owned) -> None:
        assert worker.scope is not None
        worker.item, worker.owned = item, owned
        owned.scopes.add(worker.scope)
        self.ctx.running += 1

    def _end(self, worker: _Worker) -> None:
        assert worker.owned is not None and worker.scope is not None
        worker.owned.scopes.discard(worker.scope)
        worker.item = worker.owned = worker.delivery = None
        self.ctx.running -= 1

    def _cancelled(self, worker: _Worker) -> None:
        """The worker's scope was cancelled while its handler ran: the partition went (no
        result to write), or the handler was stuck past its deadline (a plain failure,
        retried with the backoff until the last attempt)."""
        if worker.item is None or worker.owned is None:
            return  # the handler swallowed the cancellation and finished normally
        item, delivery = worker.item, worker.delivery
        self._end(worker)
        if (
            delivery is not None
            and delivery.stuck
            and not item.void
            and self.ctx.assignment.current(item.partition, item.epoch) is not None
        ):
            self._submit(Result(item, self._progress.stuck(delivery)))
