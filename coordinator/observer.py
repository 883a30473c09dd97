"""What a coordinator shows the outside: leader status per group, the lag of every
partition of the groups it leads (reported by the leader alone, so it is there even when
no consumer runs), and its readiness for /readyz: connected, and leading or standing by.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from pgcg.shared import metrics, tracing
from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.loops import refresh_forever
from pgcg.shared.queries import Queries

if TYPE_CHECKING:
    from pgcg.coordinator.service import Coordinator

log = logging.getLogger("pgcg.coordinator.observer")
Q = Queries("observer")

LAG_INTERVAL = 10.0


class CoordinatorObserver:
    def __init__(self, coordinator: Coordinator, *, lag_interval: float = LAG_INTERVAL) -> None:
        self.coordinator = coordinator
        self.lag_interval = lag_interval
        # group -> (topic, {partition: (messages, oldest age s)})
        self.lag: dict[str, tuple[str, dict[int, tuple[int, float]]]] = {}
        self.refreshed = anyio.Event()
        self._conn: AsyncConn | None = None
        self._stop = [
            metrics.add_source("pgcg.coordinator.leader", self._leader),
            metrics.add_source("pgcg.group.lag", self._lag_messages),
            metrics.add_source("pgcg.group.lag.age", self._lag_age),
        ]

    def close(self) -> None:
        for stop in self._stop:
            stop()
        self._stop = []

    def ready(self) -> tuple[bool, str]:
        coordinator = self.coordinator
        if not coordinator.ready.is_set():
            return False, "first election round not done yet"
        if not coordinator.elector.connected:
            return False, "no database session (reconnecting)"
        leading = sorted(coordinator.elector.leading())
        standby = sorted(g for g in coordinator.topics if g not in leading)
        return True, f"leader of {leading or 'no group'}, standby for {standby or 'no group'}"

    # -- gauges -----------------------------------------------------------------------------

    @staticmethod
    def _attributes(group: str, topic: str | None, partition: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            tracing.MESSAGING_SYSTEM: tracing.SYSTEM,
            tracing.CONSUMER_GROUP: group,
        }
        if topic is not None:
            out[tracing.DESTINATION] = topic
        if partition is not None:
            out[tracing.PARTITION] = str(partition)
        return out

    def _leader(self) -> Iterable[metrics.Reading]:
        leading = set(self.coordinator.elector.leading())
        return [
            (1.0 if group in leading else 0.0, self._attributes(group, topic))
            for group, topic in sorted(dict(self.coordinator.topics).items())
        ]

    def _current_lag(self) -> list[tuple[str, str, dict[int, tuple[int, float]]]]:
        leading = set(self.coordinator.elector.leading())
        return [(g, t, parts) for g, (t, parts) in sorted(self.lag.items()) if g in leading]

    def _lag_messages(self) -> Iterable[metrics.Reading]:
        return [
            (float(n), self._attributes(group, topic, p))
            for group, topic, parts in self._current_lag()
            for p, (n, _) in sorted(parts.items())
        ]

    def _lag_age(self) -> Iterable[metrics.Reading]:
        return [
            (age, self._attributes(group, topic, p))
            for group, topic, parts in self._current_lag()
            for p, (_, age) in sorted(parts.items())
        ]

    # -- lag refresh --------------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh the lag of the groups this coordinator leads every lag_interval."""
        await refresh_forever(self.refresh, self._drop, self.lag_interval, log)

    async def refresh(self) -> None:
        coordinator = self.coordinator
        lag: dict[str, tuple[str, dict[int, tuple[int, float]]]] = {}
        for group in sorted(coordinator.elector.leading()):
            topic = coordinator.topics.get(group)
            if topic is None:
                continue
            if self._conn is None or self._conn.closed:
                self._conn = await connect(
                    coordinator.dsn,
                    application_name="pgcg-observer",
                    through_pooler=coordinator.through_pooler,
                )
            with translated(coordinator.dsn):
                cur = await self._conn.execute(Q.group_lag, {"group": group})
                rows = await cur.fetchall()
            lag[group] = (
                topic,
                {r["partition"]: (int(r["lag"]), float(r["age_s"])) for r in rows},
            )
        self.lag = lag
        self.refreshed.set()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
