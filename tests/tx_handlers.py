"""Transactional handlers for the exactly-once tests, importable by real consumer processes
(`--handler tests.tx_handlers:count`).

`count` increments one counter row and records the handling, all in the transaction pgcg
opened, after simulated work. While it works its backend's application_name (local to the
transaction) names the process and the message, so a test can SIGKILL a member exactly
while one of its handlers is inside a transaction.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import psycopg

from pgcg.consumer.message import Message
from pgcg.consumer.transactional import Transaction

WORK_ENV = "PGCG_TEST_TX_WORK_MS"

SCHEMA = """
CREATE TABLE public.eo_counter (id integer PRIMARY KEY, n bigint NOT NULL);
INSERT INTO public.eo_counter VALUES (1, 0);
CREATE TABLE public.eo_handled (
    seq         bigserial PRIMARY KEY,
    message_id  bigint NOT NULL,
    key         text NOT NULL,
    member_id   text NOT NULL,
    epoch       bigint NOT NULL,
    attempt     integer NOT NULL,
    pid         integer NOT NULL
);
"""

INCREMENT = "UPDATE public.eo_counter SET n = n + 1 WHERE id = 1"
RECORD = (
    "INSERT INTO public.eo_handled (message_id, key, member_id, epoch, attempt, pid) "
    "VALUES (%s, %s, %s, %s, %s, %s)"
)


def create(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SCHEMA)


def in_tx_name(pid: int, message_id: int) -> str:
    return f"eo-tx-{pid}-{message_id}"


async def count(message: Message, tx: Transaction) -> None:
    """Work a little, then count the message: all inside pgcg's transaction."""
    await tx.execute(
        "SELECT set_config('application_name', %s, true)", (in_tx_name(os.getpid(), message.id),)
    )
    work_ms = float(os.environ.get(WORK_ENV, "0") or 0)
    if work_ms:
        await anyio.sleep(work_ms / 1000)
    await tx.execute(INCREMENT)
    await tx.execute(
        RECORD,
        (message.id, message.key, message.member_id, message.epoch, message.attempt, os.getpid()),
    )


def totals(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The counter, the handled rows and the distinct messages among them."""
    row = conn.execute(
        "SELECT (SELECT n FROM public.eo_counter WHERE id = 1) AS counter, "
        "count(*) AS handled, count(DISTINCT message_id) AS distinct_messages "
        "FROM public.eo_handled"
    ).fetchone()
    assert row is not None
    if isinstance(row, dict):
        return {k: int(v) for k, v in row.items()}
    return dict(zip(("counter", "handled", "distinct_messages"), map(int, row), strict=True))
