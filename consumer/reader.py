"""Reads what the group has to handle in the partitions this member owns: log messages in
position order (woken by NOTIFY, else adaptive polling) and the group's parked messages
that are due. Reading is never fenced: nothing read starts before the writer's fenced
mark or claim.

Polling backs off to `poll_interval` while nothing comes. A member with nothing in hand
whose listener is LISTENing (a new message wakes it) waits longer: until the next parked
message of its partitions can be loaded (a retry's backoff, a delay, an abandoned claim:
nothing notifies those), at most SAFETY_POLL, which covers a notification that never came
(NOTIFY is a hint: a missed one delays a message until then, never loses it). Without a
working LISTEN (PGCG_LISTEN=false, a pooler without a session URL, the listener
reconnecting) it keeps to `poll_interval`.

When a member starts a partition it adopts it first (`pgcg.adopt`): the group's position
and what it finished above it come back, and deliveries an earlier owner started and
never finished are charged (see docs/design/storage.md).

Parking rules, which keep the position moving and memory bounded whatever the backlog:
- a message read for a key that has parked messages is parked after them (a key's parked
  messages always come first);
- a message due later than `park_after` (a producer delay) is parked with its key;
- a key whose messages hold the partition's position back longer than `park_after` is
  parked;
- a key with more than a quarter of the prefetch in memory while memory is nearly full is
  parked (one deep key must not starve the others).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from psycopg.rows import tuple_row

from pgcg.consumer.assignment import Owned
from pgcg.consumer.context import Context
from pgcg.consumer.message import Item, Message, message_id
from pgcg.consumer.writer import Writer
from pgcg.shared.db import AsyncConn, bounded, check_columns, connect, translated
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.reader")
Q = Queries("consumer")
T = TypeVar("T")

MIN_POLL = 0.05
SAFETY_POLL = 30.0  # seconds between polls of an idle member while LISTEN works
PARKED_LOAD_INTERVAL = 0.5  # seconds between looks at the parked queue, unless woken
PARKED_LOOKAHEAD = 1.0  # parked messages due within this many seconds are loaded
FOLLOWERS = 16  # messages of a parked key loaded after its first one


# The fetch's columns, in the order its rows are unpacked (sql/queries/consumer.sql).
FETCHED = (
    "partition", "state", "a_tick", "tick", "offset", "slot", "key", "payload", "headers",
    "enqueued_at", "due_in_ms", "bytes",
)  # fmt: skip


def _headers(raw: Any) -> dict[str, str]:
    if not raw:
        return {}
    if isinstance(raw, str):
        raw = json.loads(raw)
    # Per message, and traced messages all carry one: the decoded object (JSON keys are
    # strings) is kept as it is unless a value is not a string, rather than copied.
    for value in raw.values():
        if type(value) is not str:
            return {str(k): str(v) for k, v in raw.items()}
    return raw  # type: ignore[no-any-return]


class Reader:
    def __init__(self, ctx: Context, writer: Writer) -> None:
        self.ctx = ctx
        self.writer = writer
        self._conn: AsyncConn | None = None
        self._parked_at = 0.0
        self._pin_checked = 0.0
        self.waiting: float | None = None  # how long the wait under way may last (tests)
        self.round_trip_bound = ctx.round_trip_bound  # a read unanswered this long is given up

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.ctx.dsn,
                application_name="pgcg-reader",
                through_pooler=self.ctx.through_pooler,
                session_timeout=self.ctx.settings.session_timeout,
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _query(
        self,
        conn: AsyncConn,
        query: str,
        params: dict[str, Any],
        columns: Sequence[str] | None = None,
    ) -> list[Any]:
        """One read's rows, or DatabaseUnavailable if none came within the bound.

        With `columns`, rows are plain tuples in that order: the driver builds those in C,
        where a dict per row cost the fetch, which runs for every message, about a tenth
        of a busy consumer's CPU.
        """

        async def call() -> list[Any]:
            with translated(self.ctx.dsn):
                if columns is None:
                    cur = await conn.execute(query, params)
                    return await cur.fetchall()
                async with conn.cursor(row_factory=tuple_row) as tuples:
                    await tuples.execute(query, params)
                    check_columns(tuples.description, columns)
                    return await tuples.fetchall()

        return await bounded(conn, self.round_trip_bound, call)

    async def run(self) -> None:
        ctx = self.ctx
        poll = MIN_POLL
        while not ctx.stopping:
            failed = False
            try:
                got = await self.read_once()
            except DatabaseUnavailable as exc:
                log.warning("read failed: %s", exc, extra={"action": "read_failed", **ctx.fields})
                await self._drop_connection()
                got, failed = 0, True
                poll = min(max(poll * 2, 0.5), ctx.settings.poll_interval)
            if got:
                poll = MIN_POLL
                continue
            wait = poll
            # Only once backed off all the way: right after a notification the rows it
            # announced may not be readable yet (ticks), and quick polls pick them up.
            if not failed and poll >= ctx.settings.poll_interval and self._quiet():
                wait = await self._quiet_wait()
            self.waiting = wait
            woken = await ctx.wake.fetch.wait(wait)
            self.waiting = None
            poll = MIN_POLL if woken else min(poll * 2, ctx.settings.poll_interval)

    def _quiet(self) -> bool:
        """Whether only a new message, which a notification announces, or a parked message
        becoming due can give this member work: LISTEN works, and nothing is in hand that
        the reader must come back for on its own (the position check of pinned keys,
        partitions still to adopt)."""
        ctx = self.ctx
        return (
            ctx.listening()
            and ctx.membership.lease.valid()
            and not ctx.scheduler.buffered()
            and not ctx.scheduler.busy()
            and not ctx.running
            and self.writer.quiet
            and all(p.adopted for p in ctx.assignment.claimable())
        )

    async def _quiet_wait(self) -> float:
        """How long a quiet member may wait for a notification: until the next parked
        message of its partitions comes within the loading lookahead, at most SAFETY_POLL.
        The parked messages due by then were loaded by the round just made."""
        ctx = self.ctx
        partitions = [o.partition for o in ctx.assignment.claimable() if o.adopted]
        if not partitions:
            return SAFETY_POLL
        try:
            conn = await self._connection()
            rows = await self._query(conn, Q.next_parked, ctx.params(partitions=partitions))
        except DatabaseUnavailable as exc:
            log.warning("read failed: %s", exc, extra={"action": "read_failed", **ctx.fields})
            await self._drop_connection()
            return ctx.settings.poll_interval
        row = rows[0] if rows else None
        if row is None or row["due_in_ms"] is None:
            return SAFETY_POLL
        due_in = row["due_in_ms"] / 1000
        if due_in <= 0:
            # Due, and the round just made did not load it (a claim that ran out in
            # between): the normal poll, never a spin on something that stays put.
            return ctx.settings.poll_interval
        # Woken with half the lookahead to spare: that round loads it, and the scheduler
        # starts it when due.
        return min(SAFETY_POLL, max(due_in - PARKED_LOOKAHEAD / 2, MIN_POLL))

    async def read_once(self) -> int:
        """One round: adopt new partitions, load due parked messages, read the log, and
        park what must be parked. Returns how many messages were taken into memory."""
        ctx = self.ctx
        if not ctx.membership.lease.valid():
            return 0
        conn = await self._connection()
        for part in ctx.assignment.claimable():
            if not part.adopted and not self._settling(part):
                await self._adopt(conn, part)
        owned = [o for o in ctx.assignment.claimable() if o.adopted]
        if not owned:
            return 0
        now = time.monotonic()
        got = 0
        if now - self._parked_at >= PARKED_LOAD_INTERVAL or ctx.wake.parked.is_set():
            ctx.wake.parked.clear()
            self._parked_at = now
            got += await self._load_parked(conn, owned)
        got += await self._fetch(conn, owned)
        if now - self._pin_checked >= 1.0:
            self._pin_checked = now
            self._park_pinned(now)
        return got

    # -- adopting ---------------------------------------------------------------------------

    def _settling(self, part: Owned) -> bool:
        """Adopting reads back what the group finished here; a result of this member's
        own that is still on its way (a handler of an earlier holding, under the same
        epoch after the lease came back, or one that ran on through a revocation called
        off) would land after that reading, and its message be handled again. Results
        and wake-ups bring the reader back here (and it polls)."""
        partition = part.partition
        return self.writer.settling(partition) or self.ctx.assignment.settling(partition)

    async def _adopt(self, conn: AsyncConn, part: Owned) -> None:
        ctx = self.ctx
        rows = await self._query(
            conn,
            Q.adopt,
            ctx.params(
                partition=part.partition,
                epoch=part.epoch,
                max_attempts=ctx.retry.max_attempts,
                retry_delay_ms=round(ctx.retry.delay(1) * 1000),
            ),
        )
        row = rows[0] if rows else None
        if row is None:
            # Not ours at this epoch any more: the heartbeat will tell.
            ctx.wake.heartbeat.set()
            return
        if ctx.assignment.current(part.partition, part.epoch) is not part:
            return  # it moved on while we asked
        # What finished here while the adopt was on its way (messages held across it can
        # run meanwhile) may be missing from its answer: kept (see Owned.finished_log).
        finished_meanwhile = part.finished if part.gen == row["gen"] else set()
        part.gen = row["gen"]
        part.done = part.saved = row["tick"]
        part.cur = part.cur_offset = None
        part.finished = set(row["finished"]) | finished_meanwhile
        # Messages still held (a revocation called off while they ran) keep the position.
        part.unfinished.clear()
        for key in ctx.scheduler.keys(part.partition):
            for item in ctx.scheduler.items_of(key):
                if item.a_tick is not None:
                    part.read_log(item)
        part.adopted = True
        if row["charged"] or row["buried"]:
            log.warning(
                "partition %s: %s deliveries were cut off under an earlier owner: %s parked "
                "for retry, %s dead-lettered (handler never returned)",
                part.partition, row["charged"] + row["buried"], row["charged"], row["buried"],
                extra={"action": "deliveries_charged", **ctx.fields, "partition": part.partition,
                       "epoch": part.epoch, "charged": row["charged"], "buried": row["buried"]},
            )  # fmt: skip
        log.debug(
            "partition %s adopted at position %s", part.partition, part.done,
            extra={"action": "adopted", **ctx.fields, "partition": part.partition,
                   "epoch": part.epoch, "tick": part.done},
        )  # fmt: skip

    # -- the log ----------------------------------------------------------------------------

    async def _fetch(self, conn: AsyncConn, owned: list[Owned]) -> int:
        ctx = self.ctx
        room = ctx.settings.prefetch - ctx.scheduler.buffered()
        room_bytes = ctx.settings.prefetch_bytes - ctx.scheduler.buffered_bytes()
        if room <= 0 or room_bytes <= 0:
            return 0
        if ctx.scheduler.buffered() and room < ctx.settings.prefetch // 4:
            return 0  # wait for a worthwhile batch; results wake us as room frees up
        seen_rounds = self.writer.rounds
        # Rotate who goes first, so a byte budget that runs out does not always starve the
        # same partitions.
        owned = rotated(owned, int(time.monotonic() * 1000))
        rows = await self._query(
            conn,
            Q.fetch,
            ctx.params(
                partitions=[o.partition for o in owned],
                done=[o.done for o in owned],
                cur=[o.cur for o in owned],
                cur_offsets=[o.cur_offset for o in owned],
                limit=max(1, room // len(owned)),
                limit_bytes=room_bytes,
            ),
            FETCHED,
        )
        now = time.monotonic()
        by_partition = {o.partition: o for o in owned}
        fresh: list[Item] = []
        follow: list[Item] = []
        late: dict[str, float] = {}
        for r in rows:
            partition, state, _, tick, offset = r[:5]
            part = by_partition[partition]
            if (
                ctx.assignment.current(part.partition, part.epoch) is not part
                or not part.adopted
                or not taking_in(part)
            ):
                continue  # lost or reset while we read (its cursor starts over), or revoked
            if state == "e":
                part.done = max(part.done, tick)
                if part.cur is not None and part.cur <= part.done:
                    part.cur = part.cur_offset = None
                continue
            part.cur, part.cur_offset = tick, offset
            if state == "s" or offset in part.finished:
                part.finished.discard(offset)
                continue
            item = self._item(r, part, now)
            if ctx.scheduler.holds(item.uid):
                continue
            part.read_log(item)
            key = item.key
            recent = part.recent_parks.get(key)
            if (
                state == "p"
                or key in part.parked_keys
                or (recent is not None and recent > seen_rounds)
                or self.writer.parking(part.partition, key)
            ):
                follow.append(item)  # its key has parked messages: it goes after them
            else:
                fresh.append(item)
                delay = item.due - now
                if delay > ctx.settings.park_after:
                    late[key] = delay
        added = ctx.scheduler.add(fresh, now)
        for o in owned:
            o.recent_parks = {k: v for k, v in o.recent_parks.items() if v > seen_rounds}
        if follow:
            self.writer.park_rows(follow, "follow")
        for key, delay in late.items():
            self.writer.park_key(key, "delay", head_delay=delay)
        self._park_crowding(now)
        if added:
            log.debug("read %s", added, extra={"action": "read", **ctx.fields, "count": added})
            ctx.wake.dispatch.set()
        return added + len(follow)

    def _item(self, r: tuple[Any, ...], part: Owned, now: float) -> Item:
        ctx = self.ctx
        _, _, a_tick, tick, offset, slot, key, payload, headers, enqueued_at, due_in_ms, size = r
        message = Message(
            id=message_id(offset, part.partition),
            topic=ctx.topic,
            partition=part.partition,
            key=key,
            payload=payload,
            headers=_headers(headers),
            attempt=1,
            enqueued_at=enqueued_at,
            member_id=ctx.member_id,
            epoch=part.epoch,
            offset=offset,
            group=ctx.group,
        )
        return Item(
            message,
            part.epoch,
            now + due_in_ms / 1000,
            tick=tick,
            slot=slot,
            a_tick=a_tick,
            size=size,
        )

    # -- the parked queue -------------------------------------------------------------------

    async def _load_parked(self, conn: AsyncConn, owned: list[Owned]) -> int:
        ctx = self.ctx
        room = ctx.settings.prefetch - ctx.scheduler.buffered()
        if room <= 0:
            return 0
        partitions = [o.partition for o in owned]
        rows = await self._query(
            conn,
            Q.load_parked,
            ctx.params(
                partitions=partitions,
                held=ctx.scheduler.held_parked(partitions),
                lookahead_ms=round(PARKED_LOOKAHEAD * 1000),
                limit=max(1, room // (FOLLOWERS + 1)),
                followers=FOLLOWERS,
            ),
        )
        if not rows:
            return 0
        now = time.monotonic()
        by_partition = {o.partition: o for o in owned}
        items = []
        for r in rows:
            part = by_partition.get(r["partition"])
            if (
                part is None
                or ctx.assignment.current(part.partition, part.epoch) is not part
                or not taking_in(part)
            ):
                continue  # lost, or revoked (its parked messages were dropped) while we read
            part.parked_keys.add(r["key"])
            message = Message(
                id=message_id(r["offset"], part.partition),
                topic=ctx.topic,
                partition=part.partition,
                key=r["key"],
                payload=r["payload"],
                headers=_headers(r["headers"]),
                attempt=r["attempts"] + 1,
                enqueued_at=r["enqueued_at"],
                member_id=ctx.member_id,
                epoch=part.epoch,
                offset=r["offset"],
                group=ctx.group,
            )
            items.append(
                Item(message, part.epoch, now + r["due_in_ms"] / 1000, tick=r["tick"],
                     parked_id=r["id"], size=r["bytes"], suspect=r["origin"] == "interrupted")
            )  # fmt: skip
        added = ctx.scheduler.add(items, now)
        if added:
            ctx.wake.dispatch.set()
        return added

    # -- parking what holds things back -----------------------------------------------------

    def _park_pinned(self, now: float) -> None:
        """Keys that hold a partition's position back longer than `park_after` go to the
        parked queue, so the position (and with it retention and the re-read after a
        hand-off) moves on."""
        ctx = self.ctx
        for part in ctx.assignment.claimable():
            if not part.adopted:
                continue
            position = part.position()
            if position >= part.done:
                part.blocked_since = None
                continue
            if part.blocked_since is None or part.blocked_since[0] != position:
                part.blocked_since = (position, now)
                continue
            if now - part.blocked_since[1] < ctx.settings.park_after:
                continue
            keys = {
                item.key
                for key in ctx.scheduler.keys(part.partition)
                for item in ctx.scheduler.items_of(key)
                if item.a_tick == position
            }
            for key in keys:
                log.info(
                    "partition %s: key %r holds the position for over %ss: parked",
                    part.partition, key, ctx.settings.park_after,
                    extra={"action": "key_parked", **ctx.fields, "partition": part.partition,
                           "epoch": part.epoch, "reason": "pinned"},
                )  # fmt: skip
                self.writer.park_key(key, "pinned")
            part.blocked_since = (position, now)

    def _park_crowding(self, now: float) -> None:
        """When memory is nearly full: one key with more than its share goes to the parked
        queue, so the others keep being read; else keys whose first message is not due
        yet (short delays) make room for due work."""
        ctx = self.ctx
        prefetch = ctx.settings.prefetch
        full = ctx.scheduler.buffered() >= prefetch * 9 // 10 or (
            ctx.scheduler.buffered_bytes() >= ctx.settings.prefetch_bytes * 9 // 10
        )
        if not full:
            return
        deepest, count = None, 0
        for part in ctx.assignment.claimable():
            for key in ctx.scheduler.keys(part.partition):
                n = len(ctx.scheduler.items_of(key))
                if n > count:
                    deepest, count = key, n
        if deepest is not None and count > max(prefetch // 4, 1):
            log.info(
                "key %r has %s messages in memory: parked, so the other keys keep flowing",
                deepest, count, extra={"action": "key_parked", **ctx.fields, "reason": "deep"},
            )  # fmt: skip
            self.writer.park_key(deepest, "deep")
            return
        for due, key in ctx.scheduler.waiting_keys(now)[: max(prefetch // 10, 1)]:
            self.writer.park_key(key, "delay", head_delay=due - now)


def taking_in(part: Owned) -> bool:
    """Whether rows read for `part` are taken in as they arrive: not once it is being
    revoked, even if the read began before. The revocation dropped the messages it held
    but the running ones; a later message of a key, read before that and taken in now,
    would run before the key's dropped ones if the revocation is called off (those come
    back only when the partition is read again from its position)."""
    return part.state == "assigned"


def rotated(items: list[T], start: int) -> list[T]:
    """`items` starting at `start` (modulo their number): each exactly once. The start is
    taken once: two readings of a clock can differ, and a partition listed twice in one
    fetch is read twice, its messages handled twice and its position stuck for good."""
    k = start % len(items) if items else 0
    return items[k:] + items[:k]
