"""One process of the hand-written consumer loop (bench/loop.py): what a team writes instead
of a library, in as few lines as it can.

    python -m pgcg.bench.loop_worker DSN TABLE HANDLER CONCURRENCY

`connections` fetch loops, each: in one transaction, DELETE a batch of rows … FOR UPDATE
SKIP LOCKED RETURNING them, run the batch's handlers at once, commit (a crash rolls the
DELETE back: at least once). Up to CONCURRENCY handlers run at once in the process. No
partitions, no per-key order, no fencing, no retries. Prints `ready` once connected,
starts on a line `go` on stdin, and prints `done <unix time>` when it found the table
empty (the bench's end of drain), then exits.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

MAX_CONNECTIONS = 4

_TAKE = """
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table} FOR UPDATE SKIP LOCKED LIMIT %(limit)s
) RETURNING id, key, payload
"""


@dataclass(slots=True)
class LoopMessage:
    """What the bench handlers read of a message (pgcg's Message has more)."""

    id: int
    key: str
    payload: Any
    headers: dict[str, str]


def shape(concurrency: int) -> tuple[int, int]:
    """(connections, batch) per process: a few fetch loops that together keep
    `concurrency` handlers busy."""
    connections = max(1, min(MAX_CONNECTIONS, concurrency))
    return connections, math.ceil(concurrency / connections)


async def _fetch_loop(
    conn: psycopg.AsyncConnection[Any], take: sql.Composed, batch: int, handler: Any
) -> None:
    while True:
        async with conn.transaction():
            rows = await (await conn.execute(take, {"limit": batch})).fetchall()
            if not rows:
                return
            await asyncio.gather(*(handler(LoopMessage(r[0], r[1], r[2], {})) for r in rows))


async def main(dsn: str, table: str, handler_spec: str, concurrency: int) -> None:
    module, _, name = handler_spec.partition(":")
    handler = getattr(importlib.import_module(module), name)
    connections, batch = shape(concurrency)
    take = sql.SQL(_TAKE).format(table=sql.Identifier("pgcg", table))
    conns = [
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(connections)
    ]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(_fetch_loop(conn, take, batch, handler) for conn in conns))
    print(f"done {time.time()!r}", flush=True)
    for conn in conns:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
