"""Transactional handlers: `async def handle(message, tx)` runs inside a transaction on the
consumer's database, and the message's ack commits in that same transaction, so the
handler's writes, the ack and any messages it enqueues through `tx` land together or not
at all.

Fencing. The completion (tx_complete) locks the partition's assignment row FOR SHARE and
checks this member's epoch right before COMMIT, in the handler's transaction: an epoch bump by the
coordinator either waits for that commit, or has already happened and the ack matches
nothing, and then everything rolls back. A zombie's writes (a member paused past its
session, or one whose partition was handed off while it worked) never land.

The lock is taken at the end, not when the transaction opens: held for the whole handler
it would block a forced hand-off, and the coordinator's rebalance (which locks every
assignment row of the group) with it, for as long as the slowest handler runs. Opening the
transaction only checks ownership without a lock, to skip work on a partition already lost.

What this gives: effects in this database happen exactly once per message. Effects
anywhere else (HTTP calls, other databases, files) happen at least once: a handler that is
fenced, cancelled, fails or dies after such an effect runs again.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
import psycopg
from psycopg import AsyncCursor
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from pgcg.consumer import handlers
from pgcg.consumer.context import Context
from pgcg.consumer.handlers import Handler
from pgcg.consumer.message import Item, Message
from pgcg.consumer.writer import Writer, wake_after_results
from pgcg.shared.db import AsyncConn, open_pool, translated
from pgcg.shared.errors import HandlerLoadError, HandlerMisuse, LostOwnership
from pgcg.shared.producer import Enqueued, OutgoingMessage, Producer
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.transactional")
Q = Queries("consumer")

# Statements that end (or restart) a transaction, refused before they reach the server.
_TX_CONTROL = re.compile(
    r"^\s*(COMMIT|END|ROLLBACK|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION)\b(?!\s+TO\b)",
    re.IGNORECASE,
)

_HOW = (
    "pgcg commits the transaction together with the message's ack when your handler "
    "returns, and rolls it back (then retries the message) when it raises"
)


def _misuse(what: str, advice: str) -> HandlerMisuse:
    return HandlerMisuse(f"{what} is not allowed in a transactional handler: {_HOW}. {advice}")


class Transaction:
    """The `tx` a transactional handler gets: its open transaction, for queries and
    enqueues. Ending the transaction is pgcg's job; the calls that would do it raise
    HandlerMisuse. `tx` is valid only during the handler call."""

    def __init__(self, conn: AsyncConn, producer: Producer, message: Message) -> None:
        self._conn = conn
        self._producer = producer
        self._message_id = message.id
        self._open = True

    def _usable(self) -> AsyncConn:
        if not self._open:
            raise HandlerMisuse(
                f"the transaction of message {self._message_id} is over: use tx only inside "
                "the handler call that received it (not from tasks that outlive it)"
            )
        return self._conn

    def _end(self) -> None:
        self._open = False

    # -- queries ------------------------------------------------------------------------

    async def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> AsyncCursor[Any]:
        """Run a statement in the transaction; returns the cursor (rows as dicts)."""
        conn = self._usable()
        if isinstance(query, bytes):
            query = query.decode()
        match = _TX_CONTROL.match(query) if isinstance(query, str) else None
        if match:
            raise _misuse(
                f"executing {match[1].upper()}",
                "Return normally to commit, raise to roll back, and use "
                "`async with tx.transaction():` for a savepoint.",
            )
        return await conn.execute(query, params, prepare=prepare, binary=binary)

    def cursor(self, *args: Any, **kwargs: Any) -> AsyncCursor[Any]:
        """A cursor in the transaction (same arguments as psycopg's AsyncConnection.cursor)."""
        return self._usable().cursor(*args, **kwargs)  # type: ignore[no-any-return]

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> psycopg.AsyncTransaction:
        """A savepoint: `async with tx.transaction():` undoes only its block on error."""
        return self._usable().transaction(savepoint_name, force_rollback)

    @property
    def info(self) -> psycopg.ConnectionInfo:
        return self._usable().info

    # -- enqueue in the same transaction ------------------------------------------------

    async def enqueue(
        self,
        topic: str,
        key: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        dedup_key: str | None = None,
        delay: float = 0.0,
    ) -> Enqueued:
        """Enqueue a message that commits with this handler's writes and ack, or not at all."""
        return await self._producer.enqueue(
            topic, key, payload, headers=headers, dedup_key=dedup_key, delay=delay,
            conn=self._usable(),
        )  # fmt: skip

    async def enqueue_many(self, topic: str, messages: Iterable[OutgoingMessage]) -> list[Enqueued]:
        return await self._producer.enqueue_many(topic, messages, conn=self._usable())

    # -- what would end the transaction -------------------------------------------------

    async def commit(self) -> None:
        raise _misuse("tx.commit()", "Return from the handler to commit.")

    async def rollback(self) -> None:
        raise _misuse(
            "tx.rollback()",
            "Raise an exception to roll back (the message is retried), or use "
            "`async with tx.transaction():` to undo part of the work (a savepoint).",
        )

    async def close(self) -> None:
        raise _misuse("tx.close()", "The connection belongs to the consumer's pool; just return.")

    async def set_autocommit(self, value: bool) -> None:
        raise _misuse(
            "tx.set_autocommit()",
            "The handler's writes and the ack are one transaction by design; for work "
            "that must commit on its own, use a connection of your own (then it is "
            "at-least-once, not exactly-once).",
        )

    def __getattr__(self, name: str) -> Any:
        if name in {"set_isolation_level", "set_read_only", "set_deferrable", "tpc_begin",
                    "tpc_prepare", "tpc_commit", "tpc_rollback", "autocommit"}:  # fmt: skip
            raise _misuse(f"tx.{name}", "The transaction is already open.")
        raise AttributeError(
            f"tx has no attribute {name!r}: it offers execute, cursor, transaction "
            "(savepoints), info, enqueue and enqueue_many"
        )


class Transactional:
    """Runs a transactional handler and acks its message in the handler's transaction."""

    def __init__(self, ctx: Context, handler: Handler, writer: Writer) -> None:
        # Judge the user's own function, not a tracing wrapper around it.
        user = inspect.unwrap(handler)
        call = getattr(user, "__call__", None)  # noqa: B004 - callable objects too
        if not (inspect.iscoroutinefunction(user) or inspect.iscoroutinefunction(call)):
            raise HandlerLoadError(
                "a transactional handler must be `async def handle(message, tx)`: tx is an "
                "asynchronous psycopg connection, which a thread cannot use"
            )
        self.ctx = ctx
        self.handler = handler
        self.writer = writer
        self._producer = Producer(max_payload_bytes=ctx.settings.max_payload_bytes)
        self._pool: AsyncConnectionPool[AsyncConn] | None = None
        self._pool_lock = anyio.Lock()

    async def _connections(self) -> AsyncConnectionPool[AsyncConn]:
        async with self._pool_lock:
            if self._pool is None:
                # One connection per running handler at most; it grows on demand.
                size = self.ctx.settings.concurrency
                self._pool = await open_pool(
                    self.ctx.dsn, min_size=min(size, 4), max_size=size, name="pgcg-handler-tx",
                    through_pooler=self.ctx.through_pooler,
                )  # fmt: skip
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def handle(self, item: Item, message: Message) -> None:
        """Run the handler and ack `item` in one transaction.

        Returns once it committed (the key moves on). Raises LostOwnership when the epoch
        fence rejected it and HandlerMisuse when the handler ended the transaction, after
        rolling back; a handler's exception is re-raised after rolling back.
        """
        ctx = self.ctx
        pool = await self._connections()
        conn = await pool.getconn()
        try:
            parked_left = await self._run(conn, item, message)
            self._finished(item, parked_left)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await _rollback(conn)
            if isinstance(exc, HandlerMisuse):
                log.error(
                    "message %s: %s",
                    item.id, exc,
                    extra={"action": "handler_misuse", **ctx.fields, "partition": item.partition,
                           "epoch": item.epoch, "message_id": item.id},
                )  # fmt: skip
            raise
        finally:
            self.writer.finishing.discard(item)
            with anyio.CancelScope(shield=True):
                await pool.putconn(conn)

    def _finished(self, item: Item, parked_left: int | None) -> None:
        """Committed (or found completed before): the key moves on. No await before this
        since the completion, so nothing can park the finished message in between."""
        ctx = self.ctx
        owned = ctx.assignment.current(item.partition, item.epoch)
        if owned is not None:
            owned.finished_log(item)
            if item.parked:
                owned.parked_left(item.key, parked_left)
        ctx.scheduler.finish(item, time.monotonic())
        if item.parked:
            ctx.wake.parked.set()  # the key's next parked message may be loaded now
        wake_after_results(ctx)

    async def _run(self, conn: AsyncConn, item: Item, message: Message) -> int | None:
        ctx = self.ctx
        token = uuid.uuid4().hex
        params = self._params(item, token)
        with translated(ctx.dsn):
            async with conn.pipeline():  # BEGIN and tx_begin in one round trip
                await conn.execute("BEGIN")
                cur = await conn.execute(Q.tx_begin, params)
            opened = await cur.fetchone()
        if not opened or not opened["owned"]:
            raise self._fenced(item, "when the transaction opened")

        tx = Transaction(conn, self._producer, message)
        try:
            await handlers.call(self.handler, message, tx)
        finally:
            tx._end()

        status = conn.info.transaction_status
        if status != TransactionStatus.INTRANS:
            raise _broken(status, message)
        if item.parking:
            # A long delivery (a progress report) is being parked while it runs: once that
            # is written, the message is the parked row, and completing it must delete
            # that row; a ledger row for its log offset would leave the copy to run again.
            await self.writer.flush()
        # From here until the key moves on, nothing may park it (see Writer.finishing).
        self.writer.finishing.add(item)
        params = self._params(item, token)
        with translated(ctx.dsn):
            acked = await (await conn.execute(Q.tx_complete, params)).fetchone()
        assert acked is not None
        if not acked["intact"]:
            raise HandlerMisuse(
                f"message {message.id}: the handler committed the transaction pgcg opened and "
                "began another (COMMIT/BEGIN in SQL, or through the cursor's connection); "
                "whatever it wrote before that is committed and cannot be undone. "
                f"{_HOW}: never run COMMIT, ROLLBACK or BEGIN in a transactional handler."
            )
        if not acked["owned"]:
            raise self._fenced(item, "at the completion")
        if not acked["completed"]:
            # Owned, yet already completed (a second handling) or its parked row is gone:
            # its effects must not land twice.
            log.warning(
                "message %s was already completed: its transaction rolled back",
                item.id,
                extra={"action": "ack_missing", **ctx.fields, "partition": item.partition,
                       "epoch": item.epoch, "message_id": item.id},
            )  # fmt: skip
            await conn.execute("ROLLBACK")
            return None
        # Shielded: once COMMIT is sent, we must learn whether it landed.
        with anyio.CancelScope(shield=True), translated(ctx.dsn):
            await conn.execute("COMMIT")
        return acked["parked_left"]

    def _params(self, item: Item, token: str) -> dict[str, Any]:
        return self.ctx.params(
            partition=item.partition,
            epoch=item.epoch,
            tick=item.tick,
            offset=item.offset,
            slot=item.slot,
            parked_id=item.parked_id,
            token=token,
        )

    def _fenced(self, item: Item, when: str) -> LostOwnership:
        ctx = self.ctx
        log.warning(
            "transactional ack rejected for partition %s at epoch %s (%s): it belongs to a "
            "newer epoch now; the handler's writes are rolled back",
            item.partition, item.epoch, when,
            extra={"action": "ack_rejected", **ctx.fields, "partition": item.partition,
                   "epoch": item.epoch, "message_id": item.id, "mode": "transactional",
                   "count": 1},
        )  # fmt: skip
        ctx.wake.heartbeat.set()
        return LostOwnership(
            f"partition {item.partition} moved past epoch {item.epoch}: message {item.id}'s "
            "transaction rolled back"
        )


def _broken(status: TransactionStatus, message: Message) -> HandlerMisuse:
    if status == TransactionStatus.INERROR:
        return HandlerMisuse(
            f"message {message.id}: a statement failed inside the handler and the handler "
            "carried on, so the transaction is aborted and cannot commit. Let the error "
            "propagate (the message is retried), or wrap statements that may fail in "
            "`async with tx.transaction():` (a savepoint) and handle the error there."
        )
    if status == TransactionStatus.IDLE:
        return HandlerMisuse(
            f"message {message.id}: the handler ended the transaction pgcg opened (COMMIT "
            "or ROLLBACK in SQL, or through the cursor's connection); whatever it wrote "
            f"before a COMMIT is committed and cannot be undone. {_HOW}: never run COMMIT, "
            "ROLLBACK or BEGIN in a transactional handler."
        )
    if status == TransactionStatus.ACTIVE:
        return HandlerMisuse(
            f"message {message.id}: the handler returned while a query on tx was still "
            "running: await every query before returning."
        )
    return HandlerMisuse(
        f"message {message.id}: the handler's connection is unusable ({status.name})"
    )


async def _rollback(conn: AsyncConn) -> None:
    """Bring a connection back to idle after a failed or cancelled delivery, or close it so
    the pool replaces it."""
    if conn.closed:
        return
    status = conn.info.transaction_status
    if status == TransactionStatus.IDLE:
        return
    if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        try:
            await conn.execute("ROLLBACK")
            return
        except psycopg.Error:
            pass
    await conn.close()
