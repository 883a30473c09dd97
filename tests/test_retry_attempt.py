"""A retry handed out from memory is the next attempt (regression: it stayed attempt 1, so
a message that kept failing was retried forever and never dead-lettered)."""

from __future__ import annotations

from datetime import UTC, datetime

from pgcg.consumer.message import Claimed, Message
from pgcg.consumer.scheduler import KeyScheduler


def test_deferred_head_comes_back_as_the_next_attempt() -> None:
    scheduler = KeyScheduler()
    message = Message(1, "orders", 0, "k", {}, {}, 1, datetime.now(UTC))
    scheduler.add([Claimed(message, 1, 0.0)], 0.0)
    (item,) = scheduler.take(0.0, 10)
    assert item.message.attempt == 1
    scheduler.defer(item, 5.0, 0.0)
    assert scheduler.take(1.0, 10) == []
    (again,) = scheduler.take(5.0, 10)
    assert again.message.attempt == 2
    scheduler.defer(again, 6.0, 5.0)
    (third,) = scheduler.take(6.0, 10)
    assert third.message.attempt == 3
