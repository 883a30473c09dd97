"""Handlers for consumer processes the tests start (`--handler tests.handlers:record`).

Each handling is written to the `journal` table of the test database in its own
transaction, with its start and end on the database clock (clock_timestamp()), so a
test can check exactly-once handling, per-key order and that no two handlings of a key
overlapped, across processes.

TEST_HANDLER_HOLD (seconds) makes the handler take that long, and writes its start
before the wait so a test sees it in flight: a slow handler for shutdown tests.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
from psycopg_pool import AsyncConnectionPool

from pgcg.consumer.message import Message

JOURNAL_DDL = """
CREATE TABLE journal (
    entry       bigserial PRIMARY KEY,
    message_id  bigint NOT NULL,
    key         text NOT NULL,
    seq         integer,
    pid         integer NOT NULL,
    attempt     integer NOT NULL,
    started     timestamptz NOT NULL,
    ended       timestamptz
)
"""

_pool: AsyncConnectionPool[Any] | None = None
_lock: anyio.Lock | None = None


async def _connections() -> AsyncConnectionPool[Any]:
    """A few connections per process, shared by the handlers running at once."""
    global _pool, _lock
    if _lock is None:
        _lock = anyio.Lock()
    async with _lock:
        if _pool is None:
            _pool = AsyncConnectionPool(
                # TEST_JOURNAL_URL: straight to the server when pgcg goes through a pooler.
                os.environ.get("TEST_JOURNAL_URL") or os.environ["PGCG_DATABASE_URL"],
                min_size=4,
                max_size=4,
                kwargs={"autocommit": True},
                open=False,
            )
            await _pool.open(wait=True)
    return _pool


async def record(message: Message) -> None:
    began = time.monotonic()
    hold = float(os.environ.get("TEST_HANDLER_HOLD") or 0)
    pool = await _connections()
    seq = message.payload.get("seq") if isinstance(message.payload, dict) else None
    values = (message.id, message.key, seq, os.getpid(), message.attempt)
    if not hold:
        # One statement per handling: the end from the database clock, the start that
        # clock less the time this handler has run so far (monotonic), so the recorded
        # interval lies within the real one and any overlap found is real.
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO journal (message_id, key, seq, pid, attempt, started, ended) "
                "SELECT %s, %s, %s, %s, %s, now - make_interval(secs => %s), now "
                "FROM clock_timestamp() AS now",
                (*values, time.monotonic() - began),
            )
        return
    # A slow handler: its start is written first, so a test can see it in flight.
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO journal (message_id, key, seq, pid, attempt, started) "
            "VALUES (%s, %s, %s, %s, %s, clock_timestamp()) RETURNING entry",
            values,
        )
        row = await cur.fetchone()
    assert row is not None
    await anyio.sleep(hold)  # the work this handler stands for
    async with pool.connection() as conn:
        await conn.execute("UPDATE journal SET ended = clock_timestamp() WHERE entry = %s", row)


async def kill_on_poison(message: Message) -> None:
    """`record`, except that a message whose payload has "kill" ends the process at once,
    as a crash in native code or the OOM killer would: no exception, no clean exit."""
    if isinstance(message.payload, dict) and message.payload.get("kill"):
        os._exit(1)
    await record(message)
