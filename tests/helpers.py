"""Test helpers: waiting on conditions with deadlines, direct assignment, recording handlers."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import psycopg

from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings

if TYPE_CHECKING:
    from pgcg.consumer.service import Consumer

COORD = Queries("coordinator")

# Timeouts short enough for a test to see expiries and hand-offs in seconds (production:
# heartbeat 2 s, session 10 s, leader 10 s, drain 10 s). FAST_ENV is the same for the
# real processes a test starts; FAST_SETTINGS leaves the leader timeout and drain
# deadline to each module, since not all of them want the short ones.
FAST_SETTINGS: dict[str, Any] = {"heartbeat_interval": 0.5, "session_timeout": 3}
FAST_ENV = {
    "PGCG_HEARTBEAT_INTERVAL": "0.5",
    "PGCG_SESSION_TIMEOUT": "3",
    "PGCG_LEADER_TIMEOUT": "3",
    "PGCG_DRAIN_DEADLINE": "2",
}


def fast_settings(defaults: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    """FAST_SETTINGS, then a test module's `defaults`, then one test's `overrides`."""
    return Settings(**{**FAST_SETTINGS, **defaults, **overrides})


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `cond` until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def await_for(
    cond: Callable[[], Any | Awaitable[Any]], timeout: float = 20.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(0.02)


def assign(
    conn: psycopg.Connection[Any], group: str, topic: str, partitions: list[int], member: str
) -> None:
    """Give partitions to a member outright, with the coordinator's own statement."""
    conn.execute(
        COORD.assign,
        {
            "group": group,
            "topic": topic,
            "partitions": partitions,
            "members": [member] * len(partitions),
        },
    )
    conn.execute(COORD.notify_group, {"group": group})


def owners(conn: psycopg.Connection[Any], group: str) -> dict[int, tuple[str | None, int, str]]:
    rows = conn.execute(
        "SELECT partition, member_id, epoch, state FROM pgcg.partition_assignments "
        "WHERE group_name = %s ORDER BY partition",
        (group,),
    ).fetchall()
    return {r["partition"]: (r["member_id"], r["epoch"], r["state"]) for r in rows}


def pending(conn: psycopg.Connection[Any], topic: str) -> int:
    row = conn.execute("SELECT count(*) AS n FROM pgcg.messages WHERE topic = %s", (topic,))
    return int(row.fetchone()["n"])  # type: ignore[index]


def partition_of(key: str, partitions: int) -> int:
    """The documented key hash: first 4 bytes of md5(UTF-8 key), big-endian, mod partitions."""
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "big") % partitions


def key_in(partition: int, partitions: int, prefix: str = "key") -> str:
    """The first `prefix-N` key that hashes to `partition`."""
    return next(
        k for n in range(100_000) if partition_of(k := f"{prefix}-{n}", partitions) == partition
    )


@contextlib.asynccontextmanager
async def running(*consumers: Consumer) -> AsyncIterator[None]:
    """Run consumers in this test's event loop; stop them (gracefully) on the way out."""
    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(functools.partial(consumer.run, install_signal_handlers=False))
        for consumer in consumers:
            await consumer.joined.wait()
        try:
            yield
        finally:
            for consumer in consumers:
                consumer.stop()
