"""Claims rows of owned partitions into the scheduler: woken by NOTIFY, else adaptive polling."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pgcg.consumer.assignment import Owned
from pgcg.consumer.context import Context
from pgcg.consumer.message import Claimed, Message
from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.consumer.fetcher")
Q = Queries("consumer")

MIN_POLL = 0.05


def _headers(raw: Any) -> dict[str, str]:
    if raw is None:  # the claim returns null for empty headers
        return {}
    if isinstance(raw, str):
        raw = json.loads(raw)
    return {str(k): str(v) for k, v in (raw or {}).items()}


class Fetcher:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._conn: AsyncConn | None = None

    async def _connection(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.ctx.dsn,
                application_name="pgcg-fetcher",
                through_pooler=self.ctx.through_pooler,
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def run(self) -> None:
        ctx = self.ctx
        poll = MIN_POLL
        while not ctx.stopping:
            try:
                got = await self.fetch_once()
            except DatabaseUnavailable as exc:
                log.warning("claim failed: %s", exc, extra={"action": "claim_failed", **ctx.fields})
                self._conn = None
                # The claim may have committed without us hearing back: adopt again so
                # those rows are claimable once more.
                for owned in ctx.assignment.owned.values():
                    owned.adopted = False
                got = 0
                poll = min(max(poll * 2, 0.5), ctx.settings.poll_interval)
            if got:
                poll = MIN_POLL
                continue
            if await ctx.wake.fetch.wait(poll):
                poll = MIN_POLL
            else:
                poll = min(poll * 2, ctx.settings.poll_interval)

    async def fetch_once(self) -> int:
        """One claim round; returns how many messages were added."""
        ctx = self.ctx
        await self._trim_waiting()
        room = ctx.settings.prefetch - ctx.scheduler.buffered()
        owned = ctx.assignment.claimable()
        if not owned or room <= 0 or not ctx.membership.lease.valid():
            return 0
        if ctx.scheduler.buffered() and room < ctx.settings.prefetch // 4:
            return 0  # wait for a worthwhile batch; the acker wakes us as room frees up
        conn = await self._connection()
        for part in owned:
            if not part.adopted:
                await self._adopt(conn, part)
        owned = [o for o in ctx.assignment.claimable() if o.adopted]
        if not owned:
            return 0
        claimed_for = {o.partition: o for o in owned}
        with translated(ctx.dsn):
            cur = await conn.execute(
                Q.claim,
                ctx.params(
                    partitions=[o.partition for o in owned],
                    epochs=[o.epoch for o in owned],
                    limit=max(1, room // len(owned)),
                    skip_keys=ctx.scheduler.held_keys(),
                    visibility_s=ctx.settings.visibility_timeout,
                ),
            )
            rows = await cur.fetchall()
        if not rows:
            return 0
        now = time.monotonic()
        items = []
        # Oldest first across partitions (ids come from one sequence). The claim returns
        # backlogs partition by partition; handed out in that order, a member that takes
        # over several partitions would start on the last one only after the others'.
        for r in sorted(rows, key=lambda r: r["id"]):
            part = ctx.assignment.owned.get(r["partition"])
            if part is not claimed_for[r["partition"]] or part.state != "assigned":
                # While we claimed, the partition moved, was revoked, or was lost and taken
                # back under the same epoch (a self-fence): rows that incarnation dropped
                # are still claimed, so these newer ones must wait for its adopt, or they
                # would overtake them. The next owner, or adopt, claims them again.
                continue
            message = Message(
                id=r["id"],
                topic=ctx.topic,
                partition=r["partition"],
                key=r["key"],
                payload=r["payload"],
                headers=_headers(r["headers"]),
                attempt=r["attempts"] + 1,
                enqueued_at=r["enqueued_at"],
                member_id=ctx.member_id,
                epoch=r["epoch"],
            )
            items.append(Claimed(message, r["epoch"], now + r["due_in"]))
        added = ctx.scheduler.add(items, now)
        log.debug("claimed %s", added, extra={"action": "claimed", **ctx.fields, "count": added})
        ctx.wake.dispatch.set()
        return len(rows)

    async def _trim_waiting(self) -> None:
        """Put back the later messages of keys whose head waits (see KeyScheduler)."""
        ctx = self.ctx
        tail = ctx.scheduler.trim_waiting(time.monotonic())
        if not tail:
            return
        conn = await self._connection()
        with translated(ctx.dsn):
            await conn.execute(
                Q.unclaim,
                ctx.params(
                    partitions=sorted({c.partition for c in tail}), ids=[c.id for c in tail]
                ),
            )
        log.debug(
            "put back %s messages of keys waiting for a retry",
            len(tail),
            extra={"action": "unclaimed", **ctx.fields, "count": len(tail)},
        )

    async def _adopt(self, conn: AsyncConn, part: Owned) -> None:
        with translated(self.ctx.dsn):
            cur = await conn.execute(
                Q.adopt,
                self.ctx.params(
                    partition=part.partition,
                    epoch=part.epoch,
                    held=self.ctx.scheduler.held(part.partition),
                ),
            )
        part.adopted = True
        if cur.rowcount:
            log.info(
                "partition %s: re-claiming %s messages we held before",
                part.partition,
                cur.rowcount,
                extra={"action": "adopted", **self.ctx.fields, "partition": part.partition,
                       "epoch": part.epoch, "count": cur.rowcount},
            )  # fmt: skip
