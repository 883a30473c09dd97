"""Test a handler without a database: deliver a payload and read what would become of it.

    from pgcg.testing import deliver

    def test_bills_an_order():
        outcome = deliver(bill, {"id": 7, "total": "12.30"})
        assert outcome.acked

The payload goes through the same encoding the producer uses and is validated into the
type the handler declares (`message: Message[Order]`), so a test sees what a consumer
would hand over; then the handler runs and its result or exception is judged by the same
rules as in a consumer (pgcg.consumer.outcomes). `attempt` says which delivery this is,
to test the last one.

For integration tests against a real PostgreSQL, `run_until_processed(app)` runs an App
until its groups processed everything produced so far; the fixtures that give it a
database are in the opt-in pytest plugin pgcg.testing_plugin.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg

from pgcg.consumer.app import App
from pgcg.consumer.handlers import call
from pgcg.consumer.message import Message
from pgcg.consumer.outcomes import Backoff, ExceptionTypes, Outcome, outcome
from pgcg.consumer.payloads import decode, handler_payload_type
from pgcg.shared.encoding import encode
from pgcg.shared.queries import Queries

__all__ = [
    "Outcome",
    "adeliver",
    "deliver",
    "make_message",
    "run_until_processed",
    "unfinished",
]

# The statements of run_until_processed; the pytest plugin is pgcg.testing_plugin.
Q = Queries("testing")

# Deterministic where a consumer would add jitter: a test asserts on exact delays.
DEFAULT_BACKOFF_BASE = 1.0


def _default_backoff(attempt: int) -> float:
    return DEFAULT_BACKOFF_BASE * 2 ** (attempt - 1)


def make_message(
    payload: Any,
    *,
    key: str = "test-key",
    topic: str = "test",
    partition: int = 0,
    attempt: int = 1,
    headers: Mapping[str, str] | None = None,
    message_id: int = 1,
    enqueued_at: datetime | None = None,
    payload_type: Any = None,
) -> Message[Any]:
    """A Message as a consumer would deliver it: `payload` encoded to JSON and back, then
    validated as `payload_type` if given (raising PayloadValidationError if it fails)."""
    wire = json.loads(encode(payload))
    return Message(
        id=message_id,
        topic=topic,
        partition=partition,
        key=key,
        payload=decode(wire, payload_type),
        headers=dict(headers or {}),
        attempt=attempt,
        enqueued_at=enqueued_at or datetime.now(UTC),
    )


async def adeliver(
    handler: Callable[..., Any],
    payload: Any,
    *,
    attempt: int = 1,
    max_attempts: int = 10,
    retry_on: ExceptionTypes = (Exception,),
    dead_letter_on: ExceptionTypes = (),
    backoff: Backoff = _default_backoff,
    payload_type: Any = None,
    **message_fields: Any,
) -> Outcome:
    """Call `handler` with a message carrying `payload` and return its Outcome.

    `payload_type` defaults to what the handler's first parameter declares. A sync
    handler runs in a worker thread, as in a consumer. The default backoff has no jitter
    (1 s, 2 s, 4 s, ... by attempt) so delays can be asserted exactly.
    """
    target = payload_type if payload_type is not None else handler_payload_type(handler)
    error: Exception | None = None
    try:
        message = make_message(payload, attempt=attempt, payload_type=target, **message_fields)
        await call(handler, message)
    except Exception as exc:
        error = exc
    return outcome(
        error,
        attempt=attempt,
        max_attempts=max_attempts,
        retry_on=retry_on,
        dead_letter_on=dead_letter_on,
        backoff=backoff,
    )


def deliver(handler: Callable[..., Any], payload: Any, **options: Any) -> Outcome:
    """adeliver() for synchronous tests (starts its own event loop)."""

    async def run() -> Outcome:
        return await adeliver(handler, payload, **options)

    return anyio.run(run)


async def unfinished(dsn: str, group: str) -> int:
    """Messages `group` has not finished: not yet handled, or parked for a retry."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute(Q.unfinished, {"group": group})).fetchone()
    return int(row[0]) if row else 0


async def run_until_processed(app: App, *, timeout: float = 60.0, poll: float = 0.05) -> None:
    """Run `app` until every group it has handled or dead-lettered every message produced
    so far (retries included), then stop it; TimeoutError after `timeout` seconds."""
    # The app's groups, in registration order (the App keeps no public list of them).
    groups = [r.group for r in app._registered]
    async with app.running():
        with anyio.fail_after(timeout):
            for group in groups:
                while True:
                    if not await unfinished(app.dsn, group):
                        break
                    await anyio.sleep(poll)
