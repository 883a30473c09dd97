"""Every write a member makes about its messages, in rounds: one `pgcg.settle` statement per
round carries the marks of log messages about to start, the claims of parked messages
about to start, and the results of finished ones; each item is fenced by its own
partition's epoch.

Nothing starts before its mark or claim committed: a delivery is counted before it runs
(so a message that kills its process is still counted), and a member that lost a
partition cannot start anything there. Work queues up while a round is in flight and goes
out together in the next, so rounds grow with the load without a timer.

A failed message is parked with its key (its retry state must outlive this process), and
so is a key that holds its partition's position back too long; see reader.py for the
rest of the parking rules. Every few seconds the position of each partition is saved.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
import psycopg
import psycopg.errors
from psycopg.rows import tuple_row

from pgcg.consumer import observer
from pgcg.consumer.assignment import Owned
from pgcg.consumer.context import Context
from pgcg.consumer.message import Item
from pgcg.shared.db import AsyncConn, bounded, check_columns, connect, translated
from pgcg.shared.errors import DatabaseUnavailable, InvalidInput, StatementFailed
from pgcg.shared.loops import reconnecting
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.writer")
Q = Queries("consumer")

MAX_ERROR_TEXT = 2000
# Errors that refuse a round's content rather than say the database is not there.
REFUSED = (psycopg.DataError, psycopg.IntegrityError, psycopg.InternalError,
           psycopg.errors.RaiseException, InvalidInput, UnicodeError)  # fmt: skip
SAVE_INTERVAL = 2.0  # seconds between writes of a partition's position
APPLICATION_NAME = "pgcg-writer"  # the end_abandoned statement looks for it
END_WAIT = 5.0  # seconds to wait for an abandoned server process to end, at most
T = TypeVar("T")
# What the settle statement said of one write: whether it was accepted, and what it adds
# (a claim's attempt, a parked message's id, how many parked messages a key has left).
Answer = tuple[bool, Any]
UNANSWERED: Answer = (False, None)  # left out of the answer: rejected by the fence
SETTLED = ("what", "partition", "ref", "ok", "info")  # the settle statement's columns


@dataclass(frozen=True, slots=True)
class Result:
    item: Item
    error: str | None = None  # None: handled
    dead: bool = False  # dead-letter now (the handler said so, or the payload is invalid)
    retry_after: float | None = None  # seconds, when the handler asked for it
    error_refused: bool = False  # a result the database refused, sent as a dead letter

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class _Park:
    item: Item
    origin: str
    attempts: int
    delay: float
    error: str | None
    running: bool  # its delivery goes on: the parked row is claimed by this epoch


@dataclass
class _Round:
    starts: list[Item] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    parks: list[_Park] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.starts or self.results or self.parks)


class Writer:
    def __init__(self, ctx: Context, started: Callable[[list[Item], int], None]) -> None:
        self.ctx = ctx
        # Hands cleared items to the workers, with how many of the starts handed in were
        # answered (cleared or not): each of them stops holding a place in `concurrency`.
        self._started = started
        self._next = _Round()
        self._conn: AsyncConn | None = None
        # A round unanswered this long is given up and written again on a new connection:
        # a hung server process would otherwise hold every result, and with them the
        # member's keys, while the heartbeat keeps its partitions (see Context).
        self.round_trip_bound = ctx.round_trip_bound
        # The server process of a connection given up with a statement on it: ended
        # before anything is written again (see _end_abandoned).
        self._abandoned: int | None = None
        self._pid: int | None = None  # the server process of _conn, read when it opened
        self._lock = anyio.Lock()  # one round at a time
        self._saved_at = time.monotonic()
        self.rounds = 0  # completed rounds: a fetch started after round n sees its parks
        # (partition, key) -> parks handed in and not answered yet
        self._parking: collections.Counter[tuple[int, str]] = collections.Counter()
        # (partition, key) -> failed heads whose retry (a park) is handed in, not answered
        self._retrying: collections.Counter[tuple[int, str]] = collections.Counter()
        self._retry_results: dict[int, Result] = {}  # by id: Result is not hashable
        # Deliveries whose result is on its way (handed in, or a transactional handler's
        # completion): parking one now would leave a parked copy of a finished message.
        self.finishing: set[Item] = set()

    # -- what the other loops hand in -------------------------------------------------------

    def start(self, items: list[Item]) -> None:
        """Heads about to start: marked (log) or claimed (parked) before they run."""
        self._next.starts.extend(items)
        self.ctx.wake.acks.set()

    def submit(self, result: Result) -> None:
        item = result.item
        if item.parking and not item.parked:
            self._withdraw_park(item)
        self._next.results.append(result)
        self.finishing.add(item)
        if not item.parked and not result.ok and self._log_kind(result) == "p":
            # Until this retry is written, a message of the key read meanwhile must follow
            # it to the parked queue (see parking): neither the database nor the
            # partition's parked keys know of it yet.
            self._retrying[(item.partition, item.key)] += 1
            self._retry_results[id(result)] = result
            # The failed head is parked for its retry: the rest of its key in memory goes
            # after it, in the same round (a key's parked messages come first).
            for follower in self.ctx.scheduler.items_of(item.key)[1:]:
                if not follower.parking and not follower.parked:
                    follower.parking = True
                    self._park(_Park(follower, "follow", 0, 0.0, None, False))
        self.ctx.wake.acks.set()

    def park_key(self, key: str, origin: str, *, head_delay: float = 0.0) -> None:
        """Move a key, from its first message in memory on, to the group's parked queue.
        A head that is running keeps running, as a parked delivery."""
        items = self.ctx.scheduler.items_of(key)
        if not items or any(i.parking for i in items):
            return
        busy = self.ctx.scheduler.busy_head(key)
        if busy is not None and busy in self.finishing:
            return  # its head is finishing: the rest of the key may be parked after that
        for n, item in enumerate(items):
            if item.parked:
                continue  # already parked (a loaded follower); the rest follow it
            item.parking = True
            self._park(
                _Park(item, origin, item.message.attempt if item is busy else 0,
                      head_delay if n == 0 else 0.0, None, item is busy)
            )  # fmt: skip
        self.ctx.wake.acks.set()

    def park_rows(self, items: list[Item], origin: str) -> None:
        """Log messages that are not held at all (read for a key that has parked messages):
        parked straight away, in their order."""
        for item in items:
            item.parking = True
            self._park(_Park(item, origin, 0, 0.0, None, False))
        self.ctx.wake.acks.set()

    def _withdraw_park(self, item: Item) -> None:
        """A running head returned while its park waits for the next round: its result
        settles it in the log, so the park is called off. Sent in one round, the result
        would finish the message and the park leave a copy of it, claimed by the finished
        delivery, in the parked queue: handled again once the claim ran out, after the
        key's later messages. The rest of the key stays parked behind it. A park already
        on its way is answered first; the result then goes as the parked delivery's."""
        for n, park in enumerate(self._next.parks):
            if park.item is item:
                del self._next.parks[n]
                self._parked_or_not(park)
                item.parking = False
                return

    def _park(self, park: _Park) -> None:
        self._next.parks.append(park)
        self._parking[(park.item.partition, park.item.key)] += 1

    def _parked_or_not(self, park: _Park) -> None:
        """A park was answered (or given up): it no longer counts as on its way."""
        where = (park.item.partition, park.item.key)
        self._parking[where] -= 1
        if self._parking[where] <= 0:
            del self._parking[where]

    def _retry_answered(self, result: Result) -> None:
        """A retry's write was answered (or given up): it no longer counts as on its way."""
        if self._retry_results.get(id(result)) is not result:
            return
        del self._retry_results[id(result)]
        where = (result.item.partition, result.item.key)
        self._retrying[where] -= 1
        if self._retrying[where] <= 0:
            del self._retrying[where]

    def parking(self, partition: int, key: str) -> bool:
        """Whether messages of `key` are on their way to the parked queue (parks, or a
        failed head's retry): a later message of the key read meanwhile must follow them
        there, even though neither the database nor the partition's parked keys know of
        them yet."""
        return (partition, key) in self._parking or (partition, key) in self._retrying

    def settling(self, partition: int) -> bool:
        """Whether a write that finishes a log message of `partition` may still land: a
        result handed in and not answered yet (or a transactional handler's completion),
        or a park. Until then the ledger does not show everything this member finished
        there, so the partition must not be adopted (read back) yet: after a lease that
        came back under the same epoch, such a write still goes through, and the message
        would be read again from the position and handled twice."""
        return any(i.partition == partition and not i.parked for i in self.finishing) or any(
            p == partition for p, _ in (*self._parking, *self._retrying)
        )

    @property
    def pending(self) -> int:
        n = self._next
        return len(n.starts) + len(n.results) + len(n.parks)

    @property
    def quiet(self) -> bool:
        """Nothing handed in waits to be written or answered: no write of ours can still
        park a message or free a key (each such write wakes the reader when it lands)."""
        return not (self.pending or self.finishing or self._parking or self._retrying)

    # -- the loop ---------------------------------------------------------------------------

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            conn = await connect(
                self.ctx.dsn,
                application_name=APPLICATION_NAME,
                through_pooler=self.ctx.through_pooler,
                session_timeout=self.ctx.settings.session_timeout,
            )
            try:
                await self._end_abandoned(conn)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.close()
                raise
            self._conn, self._pid = conn, conn.info.backend_pid
        return self._conn

    async def _end_abandoned(self, conn: AsyncConn) -> None:
        """A statement given up on the client can still run on the server, and commit after
        the same round made again and rounds after it: a late retry or park of a message
        would then undo a later claim or completion of it (its key moving on while it is
        still parked, to run again after the key's later messages). So the server process
        of a connection dropped with a statement on it is ended, and waited for, before
        anything is written again; until it is gone, writing waits (DatabaseUnavailable,
        retried). Through a transaction pooler the process is not known: rounds there are
        not bounded, and a failed connection is trusted to have ended its statement."""
        pid = self._abandoned
        if pid is None:
            return

        async def call() -> list[dict[str, Any]]:
            with translated(self.ctx.dsn):
                wait_ms = round(min(END_WAIT, self.round_trip_bound / 2) * 1000)
                cur = await conn.execute(Q.end_abandoned, {"pid": pid, "wait_ms": wait_ms})
                return await cur.fetchall()

        rows = await bounded(conn, self.round_trip_bound, call)
        if rows and not rows[0]["ended"]:
            raise DatabaseUnavailable(
                f"the server process {pid} of a write given up has not ended yet; writing "
                "again once it has"
            )
        log.info(
            "server process %s of a write given up: %s", pid, "ended" if rows else "gone",
            extra={"action": "write_abandoned", **self.ctx.fields, "pid": pid},
        )  # fmt: skip
        self._abandoned = None

    async def _abandon(self) -> None:
        """The connection failed with a statement on it: dropped, its server process noted
        (see _end_abandoned)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self.ctx.through_pooler and self._pid:
            # Read when it opened: a connection that failed may no longer say.
            self._abandoned = self._pid
        await conn.close()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def run(self) -> None:
        while True:
            timeout = max(self._saved_at + SAVE_INTERVAL - time.monotonic(), 0.0)
            await self.ctx.wake.acks.wait(timeout)
            await self.flush()
            if time.monotonic() >= self._saved_at + SAVE_INTERVAL:
                await self.save_positions()

    async def flush(self) -> None:
        """Write everything handed in so far; returns once it is written (or dropped with
        its partition)."""
        async with self._lock:
            while self._next:
                batch, self._next = self._next, _Round()
                async for attempt in reconnecting(log, "write", **self.ctx.fields):
                    with attempt:
                        await self._write(batch)
                self.rounds += 1

    async def save_positions(self, parts: list[Owned] | None = None) -> None:
        ctx = self.ctx
        self._saved_at = time.monotonic()
        due = [
            o
            for o in (parts if parts is not None else list(ctx.assignment.owned.values()))
            if o.adopted and o.position() > o.saved
        ]
        if not due:
            return
        positions = {o.partition: o.position() for o in due}
        params = ctx.params(
            partitions=[o.partition for o in due],
            epochs=[o.epoch for o in due],
            ticks=[positions[o.partition] for o in due],
        )
        try:
            conn = await self._connection()

            async def call() -> set[int]:
                with translated(ctx.dsn):
                    cur = await conn.execute(Q.save_position, params)
                    return {r["partition"] for r in await cur.fetchall()}

            saved = await self._round_trip(conn, call)
        except DatabaseUnavailable as exc:
            await self._abandon()
            log.warning("could not save positions: %s", exc,
                        extra={"action": "position_failed", **ctx.fields})  # fmt: skip
            return
        for o in due:
            if o.partition in saved:
                o.saved = max(o.saved, positions[o.partition])

    # -- one round --------------------------------------------------------------------------

    async def _write(self, batch: _Round) -> None:
        try:
            rows = await self._settle(batch)
        except StatementFailed as exc:
            if len(batch.starts) + len(batch.results) + len(batch.parks) > 1:
                # One item's statement error must not hold back the others: split.
                for half in _halves(batch):
                    await self._write(half)
                return
            refused = self._refused_result(batch, exc)
            if refused is not None:
                await self._write(refused)
                return
            self._give_up(batch, exc)
            return
        self._apply(batch, rows)

    def _refused_result(self, batch: _Round, exc: StatementFailed) -> _Round | None:
        """A single result the database refuses to record (its retry's parked row, its
        ack), as a dead letter with the database's reason: running the handler again
        would end the same way, with no attempt counted. None if it was that already."""
        if not batch.results or batch.results[0].error_refused:
            return None
        (result,) = batch.results
        self._retry_answered(result)
        outcome = "handled" if result.ok else f"failed: {result.error}"
        reason = f"the database refused to record its result ({exc}); the handler {outcome}"
        return _Round(results=[Result(result.item, reason, dead=True, error_refused=True)])

    async def _settle(self, batch: _Round) -> list[tuple[str, int, int, bool, Any]]:
        ctx = self.ctx
        # Starts of a holding that is gone are not sent (answered as refused): a claim of
        # a lost holding beside the same message's claim under the new one would ask the
        # database to claim one row twice. The fence refuses the stale one too.
        starts = [
            i for i in batch.starts
            if not i.void and ctx.assignment.current(i.partition, i.epoch) is not None
        ]  # fmt: skip
        marks = [i for i in starts if not i.parked]
        claims = [i for i in starts if i.parked]
        log_results = [r for r in batch.results if not r.item.parked]
        parked_results = [r for r in batch.results if r.item.parked]
        kinds = [self._log_kind(r) for r in log_results]
        paired = list(zip(log_results, kinds, strict=True))
        log_items = [r.item for r in log_results] + [p.item for p in batch.parks]
        attempts = [r.item.message.attempt for r in log_results]
        attempts += [p.attempts for p in batch.parks]
        delays = [self._delay_ms(r) if k == "p" else 0 for r, k in paired]
        delays += [round(p.delay * 1000) for p in batch.parks]
        errors = [_reason(r) if k != "d" else None for r, k in paired]
        errors += [None if p.error is None else storable(p.error) for p in batch.parks]
        origins = ["retry" if k == "p" else None for k in kinds] + [p.origin for p in batch.parks]
        kinds += ["p"] * len(batch.parks)
        claimed = [False] * len(log_results) + [p.running for p in batch.parks]
        pk_kinds = [self._parked_kind(r) for r in parked_results]
        params = ctx.params(
            m_parts=[i.partition for i in marks], m_epochs=[i.epoch for i in marks],
            m_ticks=[i.tick for i in marks], m_offsets=[i.offset for i in marks],
            m_slots=[i.slot for i in marks],
            c_ids=[i.parked_id for i in claims], c_parts=[i.partition for i in claims],
            c_epochs=[i.epoch for i in claims],
            c_tokens=[f"{ctx.member_id}:{i.epoch}:{i.parked_id}:{i.message.attempt}"
                      for i in claims],
            visibility_ms=round(ctx.settings.visibility_timeout * 1000),
            l_kinds=kinds, l_parts=[i.partition for i in log_items],
            l_epochs=[i.epoch for i in log_items], l_ticks=[i.tick for i in log_items],
            l_offsets=[i.offset for i in log_items], l_slots=[i.slot for i in log_items],
            l_attempts=attempts, l_delays=delays, l_errors=errors, l_origins=origins,
            l_claimed=claimed,
            k_kinds=pk_kinds, k_ids=[r.item.parked_id for r in parked_results],
            k_parts=[r.item.partition for r in parked_results],
            k_epochs=[r.item.epoch for r in parked_results],
            k_delays=[self._delay_ms(r) if k == "r" else 0
                      for r, k in zip(parked_results, pk_kinds, strict=True)],
            k_errors=[_reason(r) if k != "d" else None
                      for r, k in zip(parked_results, pk_kinds, strict=True)],
        )  # fmt: skip
        try:
            conn = await self._connection()

            async def call() -> list[tuple[str, int, int, bool, Any]]:
                with translated(ctx.dsn):
                    # Tuples, built by the driver in C: a round answers once per message.
                    async with conn.cursor(row_factory=tuple_row) as cur:
                        await cur.execute(Q.settle, params)
                        check_columns(cur.description, SETTLED)
                        return await cur.fetchall()

            return await self._round_trip(conn, call)
        except DatabaseUnavailable:
            await self._abandon()
            raise
        except REFUSED as exc:
            # Refused for what the round holds (a value the driver cannot send, a check, a
            # trigger of the operator's, an index limit), not for want of a connection:
            # the same round would fail again. _write finds the item it is about.
            said = (str(exc).strip().splitlines() or [""])[0]
            raise StatementFailed(f"{type(exc).__name__}: {said}") from exc

    async def _round_trip(self, conn: AsyncConn, call: Callable[[], Awaitable[T]]) -> T:
        if self.ctx.through_pooler:
            return await call()  # see _end_abandoned
        return await bounded(conn, self.round_trip_bound, call)

    def _log_kind(self, r: Result) -> str:
        if r.ok:
            return "d"
        if r.dead or self.ctx.retry.exhausted(r.item.message.attempt):
            return "x"
        return "p"

    def _parked_kind(self, r: Result) -> str:
        if r.ok:
            return "d"
        if r.dead or self.ctx.retry.exhausted(r.item.message.attempt):
            return "x"
        return "r"

    def _delay_ms(self, r: Result) -> int:
        seconds = (
            r.retry_after
            if r.retry_after is not None
            else self.ctx.retry.delay(r.item.message.attempt)
        )
        return round(seconds * 1000)

    # -- what the answer means --------------------------------------------------------------

    def _apply(self, batch: _Round, rows: list[tuple[str, int, int, bool, Any]]) -> None:
        ctx = self.ctx
        now = time.monotonic()
        # The settle statement's answers (what, partition, ref, ok, info), by what they
        # answer: marks by (partition, epoch), claims and parked results by parked id,
        # log results by (partition, offset).
        marks: dict[tuple[int, int], bool] = {}
        claims: dict[int, Answer] = {}
        logs: dict[tuple[int, int], Answer] = {}
        parked: dict[int, Answer] = {}
        for what, partition, ref, ok, info in rows:
            if what == "l":
                logs[(partition, ref)] = (ok, info)
            elif what == "k":
                parked[ref] = (ok, info)
            elif what == "m":
                marks[(partition, ref)] = ok
            elif what == "c":
                claims[ref] = (ok, info)
        lost: collections.Counter[tuple[int, int]] = collections.Counter()

        cleared: list[Item] = []
        for item in batch.starts:
            owned = None if item.void else ctx.assignment.current(item.partition, item.epoch)
            if item.parked:
                ok, info = claims.get(item.parked_id, UNANSWERED)  # type: ignore[arg-type]
                if ok:
                    item.message = replace(item.message, attempt=int(info))
            else:
                ok = bool(marks.get((item.partition, item.epoch)))
            if ok and owned is not None and owned.state == "assigned":
                cleared.append(item)
                continue
            # Not started: a revoked partition (nothing new may start), a lost one, or a
            # parked message someone else holds. The key is idle again; what happens to it
            # is the partition's business.
            ctx.scheduler.unstart(item, now)
            if item.parked and owned is not None and owned.state == "assigned":
                ctx.scheduler.drop_key(item.key, keep_busy=False)
            elif owned is not None and owned.state == "assigned":
                # A refused start is no evidence the partition went: the leader may have
                # just begun revoking it (nothing new may start, in-flight work may still
                # finish and be acked). Dropping it here cancelled that work and lost its
                # pending acks, a redelivery with no fault. The heartbeat tells which.
                ctx.wake.heartbeat.set()
        if batch.starts:
            self._started(cleared, len(batch.starts))

        accepted: list[Result] = []
        for result in batch.results:
            self._retry_answered(result)
            item = result.item
            if item.parked:
                ok, info = parked.get(item.parked_id, UNANSWERED)  # type: ignore[arg-type]
            else:
                ok, info = logs.get((item.partition, item.offset), UNANSWERED)
            if not ok:
                lost[(item.partition, item.epoch)] += 1
                continue
            accepted.append(result)
            self._settled(result, info, now)

        for park in batch.parks:
            self._parked_or_not(park)
            ok, info = logs.get((park.item.partition, park.item.offset), UNANSWERED)
            if not ok:
                lost[(park.item.partition, park.item.epoch)] += 1
                park.item.parking = False
                continue
            self._parked(park, info, now)

        for (partition, epoch), count in lost.items():
            owned = ctx.assignment.current(partition, epoch)
            if owned is None:
                continue  # already dropped
            log.warning(
                "write rejected for partition %s at epoch %s: it belongs to a newer epoch now",
                partition, epoch,
                extra={"action": "ack_rejected", **ctx.fields, "partition": partition,
                       "epoch": epoch, "count": count},
            )  # fmt: skip
            ctx.assignment.lose(partition, "write rejected by the epoch fence")
            ctx.wake.heartbeat.set()
        self.finishing.difference_update(r.item for r in batch.results)
        observer.record_results(ctx, accepted)
        wake_after_results(ctx)

    def _settled(self, result: Result, info: Any, now: float) -> None:
        ctx = self.ctx
        item = result.item
        owned = ctx.assignment.current(item.partition, item.epoch)
        kind = (self._parked_kind if item.parked else self._log_kind)(result)
        if item.void:
            # Handled under a holding of the partition that is gone: what is held now
            # read its state afresh. A retry still parked the key, in the database.
            if kind not in ("d", "x") and owned is not None:
                owned.parked_keys.add(item.key)
            return
        if not item.parked and owned is not None:
            owned.finished_log(item)
        if kind in ("d", "x"):
            ctx.scheduler.finish(item, now)
            if item.parked and owned is not None:
                owned.parked_left(item.key, info)
                if info and not any(i.parked for i in ctx.scheduler.items_of(item.key)):
                    # The last of the key's loaded parked messages: the key's next ones can
                    # be loaded now. Left to the reader's next look at the parked queue, a
                    # deep key would stand idle for part of that interval every FOLLOWERS
                    # messages.
                    ctx.wake.parked.set()
                    ctx.wake.fetch.set()
            if kind == "x":
                log.warning(
                    "message %s dead-lettered after %s attempts: %s",
                    item.id, item.message.attempt, result.error,
                    extra={"action": "message_dead_lettered", **ctx.fields,
                           "partition": item.partition, "epoch": item.epoch,
                           "message_id": item.id, "attempt": item.message.attempt},
                )  # fmt: skip
            return
        # Retried later, from the parked queue: the key leaves memory until then.
        ctx.scheduler.drop_key(item.key, keep_busy=False)
        if owned is not None:
            owned.parked_keys.add(item.key)
        log.info(
            "message %s failed (attempt %s), retry in %.2fs: %s",
            item.id, item.message.attempt, self._delay_ms(result) / 1000, result.error,
            extra={"action": "message_retry", **ctx.fields, "partition": item.partition,
                   "epoch": item.epoch, "message_id": item.id,
                   "attempt": item.message.attempt},
        )  # fmt: skip

    def _parked(self, park: _Park, info: Any, now: float) -> None:
        ctx = self.ctx
        item = park.item
        item.parking = False
        owned = ctx.assignment.current(item.partition, item.epoch)
        if owned is None:
            return
        if item.void:
            owned.parked_keys.add(item.key)
            owned.recent_parks[item.key] = self.rounds + 1
            return
        owned.finished_log(item)
        owned.parked_keys.add(item.key)
        owned.recent_parks[item.key] = self.rounds + 1
        if park.running and info is not None:
            ctx.scheduler.reidentify(item, int(info))
            return
        if ctx.scheduler.holds(item.uid):
            ctx.scheduler.drop_key(item.key)
        log.debug(
            "message %s parked (%s)", item.id, park.origin,
            extra={"action": "message_parked", **ctx.fields, "partition": item.partition,
                   "epoch": item.epoch, "message_id": item.id, "origin": park.origin},
        )  # fmt: skip

    def _give_up(self, batch: _Round, exc: StatementFailed) -> None:
        """A single item the database refuses to write, even as a dead letter: logged, and
        left unfinished, tried again after the longest retry backoff (or by the next owner);
        it holds back nothing but its key."""
        ctx = self.ctx
        items = [*batch.starts, *[r.item for r in batch.results], *[p.item for p in batch.parks]]
        self.finishing.difference_update(r.item for r in batch.results)
        for result in batch.results:
            self._retry_answered(result)
        for item in items:
            log.error(
                "message %s: the database refused its write (%s); it stays unfinished",
                item.id, exc,
                extra={"action": "write_failed", **ctx.fields, "partition": item.partition,
                       "epoch": item.epoch, "message_id": item.id},
            )  # fmt: skip
            item.parking = False
            # Not at once: the same write would be refused again, in a loop.
            item.due = time.monotonic() + ctx.settings.retry_max
            ctx.scheduler.unstart(item, time.monotonic())
        for park in batch.parks:
            self._parked_or_not(park)
        if batch.starts:
            self._started([], len(batch.starts))


def _reason(r: Result) -> str | None:
    return None if r.error is None else storable(r.error[:MAX_ERROR_TEXT])


def storable(text: str) -> str:
    """`text` as PostgreSQL can store it: a handler's error may hold a NUL (text columns
    refuse it) or a lone surrogate (not UTF-8), and either would make the database refuse
    the whole round of results it rides in. Both are escaped, as repr() would."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


def _halves(batch: _Round) -> list[_Round]:
    entries: list[tuple[str, Any]] = (
        [("s", i) for i in batch.starts]
        + [("r", r) for r in batch.results]
        + [("p", p) for p in batch.parks]
    )
    mid = len(entries) // 2
    out = []
    for part in (entries[:mid], entries[mid:]):
        half = _Round()
        for kind, value in part:
            {"s": half.starts, "r": half.results, "p": half.parks}[kind].append(value)
        out.append(half)
    return out


def wake_after_results(ctx: Context) -> None:
    """Results were committed (here, or by a transactional handler with its own writes):
    keys may move on, revoked partitions may be drained, room freed up, parked keys may
    have their next message to load."""
    ctx.wake.dispatch.set()
    ctx.wake.release.set()
    if ctx.scheduler.buffered() < ctx.settings.prefetch // 2:
        ctx.wake.fetch.set()
