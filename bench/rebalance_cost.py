"""What one rebalance of a big group costs, in-process, with no consumer processes.

Members are rows in pgcg.consumer_groups, joined with the consumers' own statement; the
benchmark wins the election with the coordinator's Elector and calls the coordinator's
`rebalance` on the leader session, exactly as the service does. Each repeat starts from
an empty group and times four rebalances:

  initial  every partition unassigned, all members just joined: one assign each
  noop     nothing changed: what every sweep (each heartbeat interval) costs the leader
  leave    one member left: its partitions are handed to the others at once (forced)
  join     one member joined: the others are asked to revoke its share
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import anyio

from pgcg.coordinator import rebalancer
from pgcg.coordinator.elector import Elector
from pgcg.shared.db import AsyncConn, connect
from pgcg.shared.producer import create_topic
from pgcg.shared.queries import Queries, load

Q = Queries("bench_rebalance")
CONSUMER_Q = Queries("consumer")
# Long enough that no member expires during the benchmark.
SESSION_MS = 3_600_000
LEADER_TIMEOUT = 30.0
DRAIN_DEADLINE = 10.0
KINDS = ("initial", "noop", "leave", "join")
QUERY_NAMES = {text: name for name, text in load("coordinator").items()}


class CountingConn:
    """Passes everything to the leader's connection and counts (and times) `execute`
    calls, so a rebalance that changes nothing (and returns no Outcome) is counted too."""

    def __init__(self, conn: AsyncConn) -> None:
        self.conn = conn
        self.statements = 0
        self.timings: dict[str, float] = {}  # query name -> milliseconds

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        started = time.perf_counter()
        try:
            return await self.conn.execute(query, *args, **kwargs)
        finally:
            name = QUERY_NAMES.get(query, "other")
            ms = (time.perf_counter() - started) * 1000
            self.timings[name] = round(self.timings.get(name, 0.0) + ms, 3)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class CostBench:
    def __init__(self, dsn: str, *, run_id: str, members: int, partitions: int) -> None:
        self.dsn = dsn
        self.group = f"bench-rb-cost-{run_id}"
        self.topic = f"bench_rb_cost_{run_id}"
        self.members = members
        self.partitions = partitions
        self.elector = Elector(dsn, leader_timeout=LEADER_TIMEOUT)
        self._next_member = 0

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {"group": self.group, "topic": self.topic, **extra}

    async def _setup(self, conn: AsyncConn) -> None:
        await create_topic(conn, self.topic, self.partitions)
        # The group and its assignment rows, as a consumer's first join makes them.
        await conn.execute(CONSUMER_Q.create_group, self._params())

    async def _join(self, conn: AsyncConn, count: int) -> list[str]:
        joined = []
        async with conn.transaction():
            for _ in range(count):
                self._next_member += 1
                member = f"bench-member-{self._next_member:05d}"
                await conn.execute(
                    CONSUMER_Q.join,
                    self._params(
                        member=member,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                        session_timeout_ms=SESSION_MS,
                    ),
                )
                joined.append(member)
        return joined

    async def _once(self) -> dict[str, Any]:
        """One rebalance on the leader session, as Coordinator.rebalance_group runs it."""
        await self.elector.tick([self.group])  # renews the leader row
        epoch = self.elector.leader_epoch(self.group)
        if epoch is None:
            raise RuntimeError(f"the benchmark could not lead group {self.group}")
        async with self.elector.conn_lock:
            counting = CountingConn(await self.elector.connection())
            started = time.perf_counter()
            outcome = await rebalancer.rebalance(
                counting,  # type: ignore[arg-type]
                group=self.group,
                topic=self.topic,
                leader_id=self.elector.leader_id,
                leader_epoch=epoch,
                leader_timeout=LEADER_TIMEOUT,
                drain_deadline=DRAIN_DEADLINE,
                reason="bench",
            )
            wall_ms = (time.perf_counter() - started) * 1000
        if outcome is not None:
            assert outcome.statements == counting.statements
        return {
            "wall_ms": wall_ms,
            "statements": counting.statements,
            "moves": len(outcome.moves) if outcome else 0,
            "recorded": outcome is not None,
            "statement_ms": counting.timings,
        }

    async def run(self, repeat: int) -> dict[str, list[dict[str, Any]]]:
        samples: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        # The rebalancer logs every move at info and each forced one at warning.
        quiet = logging.getLogger("pgcg.coordinator")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        conn = await connect(self.dsn, application_name="pgcg-bench")
        try:
            await self._setup(conn)
            for _ in range(repeat):
                await conn.execute(Q.reset_group, self._params())
                members = await self._join(conn, self.members)
                samples["initial"].append(await self._once())
                samples["noop"].append(await self._once())
                await conn.execute(CONSUMER_Q.leave, self._params(member=members[0]))
                samples["leave"].append(await self._once())
                await self._join(conn, 1)
                samples["join"].append(await self._once())
        finally:
            with anyio.CancelScope(shield=True):
                await self.elector.close()
                await conn.close()
            quiet.setLevel(level)
        return samples


def measure(dsn: str, *, run_id: str, members: int, partitions: int, repeat: int) -> Any:
    bench = CostBench(dsn, run_id=run_id, members=members, partitions=partitions)
    return anyio.run(bench.run, repeat), bench.group, bench.topic
