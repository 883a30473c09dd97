"""Enqueue messages: one or a batch, inside the caller's transaction or standalone.

The partition of each ordering key is computed by PostgreSQL (pgcg.partition_for), so
every producer agrees whatever its language. Input is checked before anything is sent:
a bad message fails the whole call and nothing is written.

Each call is a `send <topic>` PRODUCER span when tracing is on, and its W3C trace context
(traceparent, tracestate) goes into every message's headers, unless the message carries
its own, so the consumer's processing span continues the caller's trace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgcg.shared import names, tracing
from pgcg.shared.db import translated
from pgcg.shared.encoding import encode
from pgcg.shared.errors import InvalidInput, PayloadTooLarge
from pgcg.shared.queries import Queries
from pgcg.shared.settings import MAX_DELAY_SECONDS

Q = Queries("producer")

# The same limits as pgcg.enqueue checks in SQL (pgcg.max_key_bytes() ...), in UTF-8 bytes:
# checked here first so a bad message fails before anything is sent, with its position.
MAX_KEY_BYTES = 1024
MAX_DEDUP_KEY_BYTES = 512
MAX_HEADERS_BYTES = 65536
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576


@dataclass(frozen=True)
class OutgoingMessage:
    key: str
    payload: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    dedup_key: str | None = None
    delay: float = 0.0  # seconds before the message may be handled


@dataclass(frozen=True)
class Enqueued:
    id: int | None  # None when the same key and dedup key were enqueued within the window
    partition: int


def _text_problem(value: Any) -> str | None:
    """Why PostgreSQL text or jsonb cannot hold this value's strings, or None if it can."""
    if isinstance(value, str):
        if "\x00" in value:
            return "contains a NUL character, which PostgreSQL text cannot hold"
        try:
            value.encode()
        except UnicodeEncodeError:
            return "contains a lone surrogate, which is not valid Unicode"
        return None
    if isinstance(value, Mapping):
        items: Iterable[Any] = (x for kv in value.items() for x in kv)
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    return next((p for p in map(_text_problem, items) if p is not None), None)


def _encode(
    messages: Sequence[OutgoingMessage],
    max_payload_bytes: int,
    trace_headers: Mapping[str, str] | None = None,
) -> dict[str, list[Any]]:
    keys: list[str] = []
    payloads: list[str] = []
    headers: list[str | None] = []
    dedup: list[str | None] = []
    delays: list[int | None] = []
    for n, msg in enumerate(messages):
        where = f"message {n}" if len(messages) > 1 else "message"
        if not isinstance(msg.key, str) or not msg.key:
            raise InvalidInput(f"{where}: the ordering key must be a non-empty string")
        try:
            text = encode(msg.payload)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: the payload is not JSON-serialisable: {exc}") from exc
        # json.dumps escapes NUL and lone surrogates, which jsonb then refuses mid-batch;
        # only look closer when an escape that could be one is there at all (in the JSON:
        # a model or dataclass hides its strings from _text_problem).
        suspect = "\\u0000" in text or "\\ud" in text
        for name, value in (
            ("ordering key", msg.key),
            ("dedup key", msg.dedup_key),
            ("headers", msg.headers),
            ("payload", json.loads(text) if suspect else None),
        ):
            problem = _text_problem(value)
            if problem:
                raise InvalidInput(f"{where}: the {name} {problem}")
        # A character is at most 4 bytes in UTF-8: only long texts need encoding to measure.
        if len(text) * 4 > max_payload_bytes and len(text.encode()) > max_payload_bytes:
            raise PayloadTooLarge(
                f"{where}: the payload is {len(text.encode())} bytes, over the limit of "
                f"{max_payload_bytes} (PGCG_MAX_PAYLOAD_BYTES); store large data elsewhere "
                "and enqueue a reference"
            )
        # Bytes, not characters: the database stores and indexes UTF-8, where one
        # character may take four.
        if len(msg.key) * 4 > MAX_KEY_BYTES and len(msg.key.encode()) > MAX_KEY_BYTES:
            raise InvalidInput(
                f"{where}: the ordering key is {len(msg.key.encode())} bytes in UTF-8, over "
                f"the limit of {MAX_KEY_BYTES}"
            )
        if not isinstance(msg.headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in msg.headers.items()
        ):
            raise InvalidInput(f"{where}: headers must map strings to strings")
        if msg.dedup_key is not None and (not isinstance(msg.dedup_key, str) or not msg.dedup_key):
            raise InvalidInput(f"{where}: a dedup key must be a non-empty string")
        if msg.dedup_key is not None and len(msg.dedup_key.encode()) > MAX_DEDUP_KEY_BYTES:
            raise InvalidInput(
                f"{where}: the dedup key is {len(msg.dedup_key.encode())} bytes in UTF-8, over "
                f"the limit of {MAX_DEDUP_KEY_BYTES}"
            )
        if not isinstance(msg.delay, int | float) or msg.delay < 0 or not math.isfinite(msg.delay):
            raise InvalidInput(f"{where}: delay must be a finite number of seconds >= 0")
        if msg.delay > MAX_DELAY_SECONDS:
            raise InvalidInput(
                f"{where}: delay {msg.delay:g} s is over the limit of {MAX_DELAY_SECONDS} s "
                "(10 years)"
            )
        keys.append(msg.key)
        payloads.append(text)
        merged = tracing.with_trace_headers(msg.headers, trace_headers or {})
        # Written the way jsonb prints them back, so the size is the one the database
        # checks against pgcg.max_headers_bytes().
        header_text = json.dumps(dict(merged), ensure_ascii=False) if merged else None
        if header_text is not None and len(header_text.encode()) > MAX_HEADERS_BYTES:
            raise InvalidInput(
                f"{where}: the headers are {len(header_text.encode())} bytes, over the limit "
                f"of {MAX_HEADERS_BYTES}"
            )
        headers.append(header_text)
        dedup.append(msg.dedup_key)
        delays.append(round(msg.delay * 1000) if msg.delay else None)
    return {
        "keys": keys,
        "payloads": payloads,
        "headers": headers if any(h is not None for h in headers) else None,
        "dedup_keys": dedup if any(d is not None for d in dedup) else None,
        "delays_ms": delays if any(d is not None for d in delays) else None,
    }


def _params(
    topic: str,
    messages: Iterable[OutgoingMessage],
    max_payload_bytes: int,
    trace_headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    names.topic_name(topic)
    batch = list(messages)
    if not batch:
        raise InvalidInput("nothing to enqueue: the batch is empty")
    return {"topic": topic, **_encode(batch, max_payload_bytes, trace_headers)}


def _result(rows: list[tuple[int, int | None, int]]) -> list[Enqueued]:
    return [Enqueued(id=row[1], partition=row[2]) for row in rows]


class Producer:
    """Enqueues into topics. Pass the caller's connection to enqueue inside its transaction
    (the messages commit or roll back with the caller's own writes), or give the producer
    a pool to enqueue standalone."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any] | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self._pool = pool
        self.max_payload_bytes = max_payload_bytes

    async def enqueue(
        self,
        topic: str,
        key: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        dedup_key: str | None = None,
        delay: float = 0.0,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> Enqueued:
        msg = OutgoingMessage(key, payload, headers or {}, dedup_key, delay)
        return (await self.enqueue_many(topic, [msg], conn=conn))[0]

    async def enqueue_many(
        self,
        topic: str,
        messages: Iterable[OutgoingMessage],
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[Enqueued]:
        with tracing.send_span(topic) as (span, trace_headers):
            params = _params(topic, messages, self.max_payload_bytes, trace_headers)
            if conn is not None:
                done = await self._run(conn, params)
            elif self._pool is None:
                raise InvalidInput("pass conn=... or create the Producer with a connection pool")
            else:
                async with self._pool.connection() as pooled:
                    done = await self._run(pooled, params)
            tracing.sent(span, done)
            return done

    @staticmethod
    async def _run(conn: psycopg.AsyncConnection[Any], params: dict[str, Any]) -> list[Enqueued]:
        with translated():
            async with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
                await cur.execute(Q.enqueue, params)
                return _result(await cur.fetchall())


class SyncProducer:
    """Producer for synchronous code: the same messages, checks and trace context as
    Producer, on a psycopg Connection.

    `conn=` may be a psycopg Connection, or a SQLAlchemy Session or Connection on the
    psycopg driver (`postgresql+psycopg://`): the messages then go through the
    connection under the ORM's transaction and commit or roll back with it. Without
    `conn=`, the producer takes a connection from its pool and commits at once.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any] | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self._pool = pool
        self.max_payload_bytes = max_payload_bytes

    def enqueue(
        self,
        topic: str,
        key: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        dedup_key: str | None = None,
        delay: float = 0.0,
        conn: Any = None,
    ) -> Enqueued:
        msg = OutgoingMessage(key, payload, headers or {}, dedup_key, delay)
        return self.enqueue_many(topic, [msg], conn=conn)[0]

    def enqueue_many(
        self, topic: str, messages: Iterable[OutgoingMessage], *, conn: Any = None
    ) -> list[Enqueued]:
        if conn is not None:
            from pgcg.shared.orm import psycopg_connection

            return enqueue_many_sync(
                psycopg_connection(conn), topic, messages, max_payload_bytes=self.max_payload_bytes
            )
        if self._pool is None:
            raise InvalidInput("pass conn=... or create the SyncProducer with a connection pool")
        with self._pool.connection() as pooled:
            return enqueue_many_sync(
                pooled, topic, messages, max_payload_bytes=self.max_payload_bytes
            )


def enqueue_many_sync(
    conn: psycopg.Connection[Any],
    topic: str,
    messages: Iterable[OutgoingMessage],
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[Enqueued]:
    """The same as Producer.enqueue_many for a synchronous psycopg connection."""
    with tracing.send_span(topic) as (span, trace_headers):
        params = _params(topic, messages, max_payload_bytes, trace_headers)
        with translated(), conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
            cur.execute(Q.enqueue, params)
            done = _result(cur.fetchall())
        tracing.sent(span, done)
        return done


async def create_topic(conn: psycopg.AsyncConnection[Any], name: str, partitions: int = 16) -> bool:
    """Create a topic and its partition tables; False if it already existed identically."""
    names.topic_name(name)
    if not isinstance(partitions, int) or not 1 <= partitions <= 1024:
        raise InvalidInput("a topic has between 1 and 1024 partitions")
    with translated():
        cur = await conn.execute(Q.create_topic, {"name": name, "partitions": partitions})
        row = await cur.fetchone()
    return bool(row and (row["created"] if isinstance(row, dict) else row[0]))
