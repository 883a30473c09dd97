"""Topic upkeep, run by every coordinator for every topic: rotate the log's segments, seal
and reclaim them by retention, trim ticks and expired dedup digests (pgcg.maintain). The
database lets one coordinator at a time do a topic's round; the others' calls return
nothing, so no leadership is needed here and upkeep goes on while any coordinator runs."""

from __future__ import annotations

import logging

import anyio

from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import DatabaseUnavailable, StatementFailed
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.coordinator.retention")
Q = Queries("coordinator")


class Retention:
    def __init__(self, dsn: str, interval: float, fields: dict[str, object]) -> None:
        self.dsn = dsn
        self.interval = interval
        self.fields = fields
        self.through_pooler = False  # set by the coordinator once it knows (pooler.py)
        self._conn: AsyncConn | None = None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.round()
                except DatabaseUnavailable as exc:
                    log.debug("topic upkeep postponed: %s", exc, extra={"action": "db_retry"})
                    await self._drop()
                await anyio.sleep(self.interval)
        finally:
            with anyio.CancelScope(shield=True):
                await self._drop()

    async def round(self) -> list[dict[str, object]]:
        """One round over every topic; returns what was done (for tests and the log)."""
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.dsn, application_name="pgcg-retention", through_pooler=self.through_pooler
            )
        done: list[dict[str, object]] = []
        with translated(self.dsn):
            topics = [r["name"] for r in await (await self._conn.execute(Q.topics)).fetchall()]
        for topic in topics:
            try:
                with translated(self.dsn):
                    cur = await self._conn.execute(Q.maintain, {"topic": topic})
                    rows = await cur.fetchall()
            except StatementFailed as exc:
                log.error(
                    "upkeep of topic %s failed: %s", topic, exc,
                    extra={"action": "upkeep_failed", "topic": topic, **self.fields},
                )  # fmt: skip
                continue
            for row in rows:
                done.append({"topic": topic, **row})
                self._report(topic, row)
        return done

    def _report(self, topic: str, row: dict[str, object]) -> None:
        event, seq = row["event"], row["seq"]
        fields = {"topic": topic, "segment": seq, **self.fields}
        if event == "lost":
            log.warning(
                "topic %s: segment %s reclaimed by the hard retention limit; group %s lost "
                "%s unfinished message(s) of partition %s",
                topic, seq, row["group_name"], row["n"], row["partition"],
                extra={"action": "retention_dropped", **fields, "group": row["group_name"],
                       "partition": row["partition"], "count": row["n"]},
            )  # fmt: skip
        elif event == "held":
            log.debug(
                "topic %s: segment %s is due but group %s still needs it in partition %s",
                topic, seq, row["group_name"], row["partition"],
                extra={"action": "retention_held", **fields, "group": row["group_name"],
                       "partition": row["partition"], "count": row["n"]},
            )  # fmt: skip
        elif event == "trimmed":
            log.debug("topic %s: %s old tick(s) trimmed", topic, row["n"],
                      extra={"action": "ticks_trimmed", **fields, "count": row["n"]})  # fmt: skip
        else:
            log.info(
                "topic %s: segment %s %s", topic, seq, event,
                extra={"action": f"segment_{event}", **fields},
            )  # fmt: skip

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
