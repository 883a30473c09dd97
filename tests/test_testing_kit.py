"""pgcg.testing without a database: deliver a payload to a handler, read the outcome."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import anyio
import anyio.from_thread
import pytest

from pgcg import DeadLetter, Message, Retry
from pgcg.testing import adeliver, deliver, make_message


@dataclasses.dataclass(frozen=True)
class Order:
    id: int
    total: Decimal


class Declined(Exception):
    pass


seen: list[Any] = []


async def bill(message: Message[Order]) -> None:
    order = message.payload
    seen.append(order)
    if order.total < 0:
        raise DeadLetter(f"order {order.id}: negative total")
    if order.total == 0:
        raise Retry(after=30, reason="price list not loaded yet")
    if order.total > 1000:
        raise Declined("card declined")


def bill_sync(message: Message[Order]) -> None:
    anyio.from_thread.check_cancelled()  # only works in a worker thread, as in a consumer
    if message.payload.total > 1000:
        raise Declined("card declined")


def test_a_handler_that_returns_is_acked() -> None:
    seen.clear()
    assert deliver(bill, {"id": 1, "total": "12.30"}).acked
    assert seen == [Order(1, Decimal("12.30"))]  # validated into the declared type


def test_retry_after_n_seconds() -> None:
    result = deliver(bill, Order(2, Decimal(0)))
    assert result.retried and result.delay == 30


def test_dead_letter_with_its_reason() -> None:
    result = deliver(bill, {"id": 3, "total": "-1"})
    assert result.dead_lettered and result.reason == "order 3: negative total"


def test_an_exception_retries_with_backoff_until_the_last_attempt() -> None:
    first = deliver(bill, {"id": 4, "total": 5000})
    assert first.retried and first.delay == 1.0 and first.reason == "Declined: card declined"
    assert deliver(bill, {"id": 4, "total": 5000}, attempt=3).delay == 4.0
    last = deliver(bill, {"id": 4, "total": 5000}, attempt=5, max_attempts=5)
    assert last.dead_lettered and "attempt 5 of 5" in last.reason


def test_per_handler_exception_rules() -> None:
    result = deliver(bill, {"id": 5, "total": 5000}, dead_letter_on=(Declined,))
    assert result.dead_lettered and result.reason == "Declined: card declined"
    result = deliver(bill, {"id": 5, "total": 5000}, retry_on=(TimeoutError,))
    assert result.dead_lettered and "not in retry_on" in result.reason


def test_a_payload_that_does_not_validate_is_dead_lettered_and_the_handler_never_runs() -> None:
    seen.clear()
    result = deliver(bill, {"id": "seven", "total": "1"})
    assert result.dead_lettered
    assert result.reason.startswith("payload does not validate as Order: id:")
    assert seen == []


def test_a_sync_handler_runs_too() -> None:
    assert deliver(bill_sync, {"id": 6, "total": 1}).acked
    assert deliver(bill_sync, {"id": 6, "total": 5000}).retried


@pytest.mark.anyio
async def test_adeliver_inside_an_async_test() -> None:
    assert (await adeliver(bill, {"id": 7, "total": 1})).acked


def test_make_message_builds_what_a_consumer_delivers() -> None:
    message = make_message(Order(8, Decimal("1.50")), key="customer-8", attempt=2)
    assert message.payload == {"id": 8, "total": "1.50"}  # the JSON, without a type
    assert (message.key, message.attempt) == ("customer-8", 2)
    typed = make_message({"id": 8, "total": "1.50"}, payload_type=Order)
    assert typed.payload == Order(8, Decimal("1.50"))
