"""Writes handler results back in batches, each row fenced by its partition's epoch.

Results queue up while a write is in flight and go out together in the next one, so the
batch size follows the load without a timer. A key is released to its next message only
after its result is committed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import anyio
from psycopg.rows import tuple_row

from pgcg.consumer import observer
from pgcg.consumer.context import Context
from pgcg.consumer.message import Claimed
from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.loops import reconnecting
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.acker")
Q = Queries("consumer")

MAX_ERROR_TEXT = 2000

# A test build's switch, read once: results are written without the epoch fence, so the
# chaos checker (`pgcg chaos --unsafe-no-fencing`) can prove it fails when fencing is gone.
UNSAFE_NO_FENCING = os.environ.get("PGCG_UNSAFE_DISABLE_FENCING") == "1"
ACK, NACK, DEAD_LETTER = (
    (Q.ack_unfenced, Q.nack_unfenced, Q.dead_letter_unfenced)
    if UNSAFE_NO_FENCING
    else (Q.ack, Q.nack, Q.dead_letter)
)


def wake_after_results(ctx: Context, *, deferred: bool = False) -> None:
    """Results were committed (here, or by a transactional handler with its own writes):
    their keys may move on, revoked partitions may be drained, and room freed up."""
    if deferred or ctx.scheduler.held_released:
        # A key now waits (its later messages can go back to the table), or a held key
        # moved on (its later messages can be claimed again).
        ctx.scheduler.held_released = False
        ctx.wake.fetch.set()
    ctx.wake.dispatch.set()
    ctx.wake.release.set()
    if ctx.scheduler.buffered() < ctx.settings.prefetch // 2:
        ctx.wake.fetch.set()


@dataclass(frozen=True, slots=True)
class Result:
    item: Claimed
    error: str | None = None  # None: handled; else the failure to record

    @property
    def ok(self) -> bool:
        return self.error is None


class Acker:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._pending: list[Result] = []
        self._conn: AsyncConn | None = None
        # A flush returns only when everything submitted before it is written, even if
        # another task's flush had already taken that batch (a release waits for it).
        self._flush_lock = anyio.Lock()
        if UNSAFE_NO_FENCING:
            log.warning(
                "PGCG_UNSAFE_DISABLE_FENCING=1: acks are NOT fenced by the partition epoch; "
                "a zombie's results will be accepted. Test builds only, never production.",
                extra={"action": "unsafe_no_fencing", **ctx.fields},
            )

    def submit(self, result: Result) -> None:
        self._pending.append(result)
        self.ctx.wake.acks.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.ctx.dsn, application_name="pgcg-acker", through_pooler=self.ctx.through_pooler
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def run(self) -> None:
        while True:
            await self.ctx.wake.acks.wait()
            await self.flush()

    async def flush(self) -> None:
        async with self._flush_lock:
            while self._pending:
                batch, self._pending = self._pending, []
                async for attempt in reconnecting(log, "ack", **self.ctx.fields):
                    with attempt:
                        await self._write(batch)

    async def _write(self, batch: list[Result]) -> None:
        ctx = self.ctx
        acks = [r.item for r in batch if r.ok]
        failures = [r for r in batch if not r.ok]
        retries = [r for r in failures if not ctx.retry.exhausted(r.item.message.attempt)]
        dead = [r for r in failures if ctx.retry.exhausted(r.item.message.attempt)]
        delays = [ctx.retry.delay(r.item.message.attempt) for r in retries]
        try:
            conn = await self._connection()
            done: set[int] = set()
            with translated(ctx.dsn):
                if acks:
                    done |= await self._run(conn, ACK, acks)
                if retries:
                    done |= await self._run(
                        conn,
                        NACK,
                        [r.item for r in retries],
                        delays_ms=[round(d * 1000) for d in delays],
                        errors=[r.error for r in retries],
                    )
                if dead:
                    done |= await self._run(
                        conn, DEAD_LETTER, [r.item for r in dead], errors=[r.error for r in dead]
                    )
        except DatabaseUnavailable:
            self._conn = None
            raise
        rejected = [r.item for r in batch if r.item.id not in done]
        if rejected:
            done |= await self._settle_rejected(conn, rejected)
        now = time.monotonic()
        delay_of = {r.item.id: d for r, d in zip(retries, delays, strict=True)}
        for result in batch:
            item = result.item
            if item.id not in done:
                continue
            if item.id in delay_of:
                # The nack counted the failure in the row; the retry is delivered from
                # memory, so it must count there too, or max_attempts is never reached.
                item.message = replace(item.message, attempt=item.message.attempt + 1)
                ctx.scheduler.defer(item, now + delay_of[item.id], now)
                log.info(
                    "message %s failed (attempt %s), retry in %.2fs: %s",
                    item.id, item.message.attempt - 1, delay_of[item.id], result.error,
                    extra={"action": "message_retry", **ctx.fields, "partition": item.partition,
                           "epoch": item.epoch, "message_id": item.id,
                           "attempt": item.message.attempt - 1},
                )  # fmt: skip
            else:
                ctx.scheduler.finish(item, now)
                if not result.ok:
                    log.warning(
                        "message %s dead-lettered after %s attempts: %s",
                        item.id, item.message.attempt, result.error,
                        extra={"action": "message_dead_lettered", **ctx.fields,
                               "partition": item.partition, "epoch": item.epoch,
                               "message_id": item.id, "attempt": item.message.attempt},
                    )  # fmt: skip
        observer.record_results(ctx, batch, done, delay_of)  # processed/retried/dead counters
        wake_after_results(ctx, deferred=bool(delay_of))

    async def _run(
        self, conn: AsyncConn, query: str, items: list[Claimed], **columns: list[object]
    ) -> set[int]:
        params = self.ctx.params(
            partitions=[i.partition for i in items],
            epochs=[i.epoch for i in items],
            ids=[i.id for i in items],
            **columns,
        )
        async with conn.cursor(row_factory=tuple_row) as cur:  # one id per row: no dicts
            await cur.execute(query, params)
            return {row[0] for row in await cur.fetchall()}

    async def _settle_rejected(self, conn: AsyncConn, rejected: list[Claimed]) -> set[int]:
        """Rows the fenced write did not touch: either our partition moved on (a zombie's
        result: drop the partition), or the row is already gone while we still own the
        partition at that epoch. Then only we can have removed it: an earlier attempt of
        this write whose answer was lost, or, after a self-fence that turned out to be
        needless, the handling of a re-claimed copy. Either way it is done; dropping the
        partition for it would only hand the key's later messages out a second time."""
        ctx = self.ctx
        settled: set[int] = set()
        with translated(ctx.dsn):
            cur = await conn.execute(Q.owned_now, ctx.params())
            still_ours = {(r["partition"], r["epoch"]) for r in await cur.fetchall()}
        lost_partitions: dict[int, int] = {}
        for item in rejected:
            if (item.partition, item.epoch) in still_ours:
                settled.add(item.id)
            else:
                lost_partitions[item.partition] = item.epoch
        for partition, epoch in lost_partitions.items():
            log.warning(
                "ack rejected for partition %s at epoch %s: it belongs to a newer epoch now",
                partition, epoch,
                extra={"action": "ack_rejected", **ctx.fields, "partition": partition,
                       "epoch": epoch,
                       "count": sum(1 for i in rejected if i.partition == partition)},
            )  # fmt: skip
            if ctx.assignment.current(partition, epoch) is not None:
                ctx.assignment.lose(partition, "ack rejected by the epoch fence")
            ctx.wake.heartbeat.set()
        return settled
