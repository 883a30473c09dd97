"""A running consumer does what a handler's exceptions ask (Retry, DeadLetter, retry_on,
dead_letter_on, its own max_attempts and backoff), and hands a handler that declares
`Message[Order]` a validated Order, dead-lettering a payload that does not validate at
once: the same rules pgcg.testing judges by, against a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pydantic
import pytest

from pgcg import DeadLetter, Message, Retry
from pgcg.consumer.service import Consumer
from pgcg.shared import dlq
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.settings import Settings
from tests.helpers import assign, await_for, fast_settings, parked, running, unfinished

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"

# A backoff far too short to tell apart from "at once", so a test sees whether a message
# was dead-lettered or retried by the count of deliveries, not by waiting.
DEFAULTS: dict[str, Any] = {"retry_base": 0.01, "retry_max": 0.02, "max_attempts": 5,
                            "drain_deadline": 2}  # fmt: skip


def settings(**overrides: Any) -> Settings:
    return fast_settings(DEFAULTS, overrides)


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


class Scripted:
    """Raises, per payload's `do`, what the test asks for; records every delivery."""

    def __init__(self) -> None:
        self.deliveries: list[Message[Any]] = []

    async def __call__(self, message: Message[Any]) -> None:
        self.deliveries.append(message)
        do = message.payload["do"]
        until = message.payload.get("until", 0)
        if message.attempt > until:
            return
        if do == "retry_later":
            raise Retry(after=3600)
        if do == "retry_now":
            raise Retry(after=0)
        if do == "dead":
            raise DeadLetter("the order was cancelled upstream")
        if do == "transient":
            raise Transient("try again")
        if do == "fatal":
            raise Fatal("never works")
        if do == "value":
            raise ValueError("not declared retriable")

    def attempts(self, seq: int) -> list[int]:
        return [m.attempt for m in self.deliveries if m.payload["seq"] == seq]


def setup(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))


def produce(db: psycopg.Connection[Any], *payloads: Any, key: str = "k") -> list[int]:
    msgs = [OutgoingMessage(f"{key}{n}", p) for n, p in enumerate(payloads)]
    return [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]  # type: ignore[misc]


def dead(db: psycopg.Connection[Any]) -> dict[int, dict[str, Any]]:
    return {r["message_id"]: r for r in dlq.list_dead(db, dlq.Filter(group=GROUP))}


async def test_the_handler_steers_each_message_with_its_exceptions(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Each message of its own key; the policy: retry Transient only, Fatal dead at once."""
    setup(db)
    handler = Scripted()
    ids = produce(
        db,
        {"seq": 0, "do": "retry_later", "until": 1},
        {"seq": 1, "do": "retry_now", "until": 2},
        {"seq": 2, "do": "dead", "until": 9},
        {"seq": 3, "do": "transient", "until": 1},
        {"seq": 4, "do": "fatal", "until": 9},
        {"seq": 5, "do": "value", "until": 9},
        {"seq": 6, "do": "ok"},
    )
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
                        retry_on=(Transient,), dead_letter_on=(Fatal,))  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: len(dead(db)) == 3, what="three dead letters")
        await await_for(lambda: handler.attempts(1) == [1, 2, 3], what="retry_now redelivered")
        await await_for(lambda: handler.attempts(3) == [1, 2], what="Transient retried")
        await await_for(lambda: unfinished(db, GROUP) == 1, what="all but the waiting one done")
        waiting = parked(db, GROUP)
    # Retry(after=3600) waits its hour, past the backoff of 0.02 s: still parked, once tried.
    assert [(r["id"], r["attempts"], r["waiting"]) for r in waiting] == [(ids[0], 1, True)]
    assert "retry requested in 3600s" in waiting[0]["last_error"]
    assert handler.attempts(0) == [1]
    letters = dead(db)
    assert sorted(letters) == [ids[2], ids[4], ids[5]]
    # Each dead-lettered on its first delivery, though max_attempts is 5.
    assert [handler.attempts(s) for s in (2, 4, 5)] == [[1], [1], [1]]
    assert letters[ids[2]]["reason"] == "the order was cancelled upstream"
    assert letters[ids[4]]["reason"] == "Fatal: never works"
    assert (
        letters[ids[5]]["reason"]
        == "ValueError: not declared retriable (not retried: not in retry_on)"
    )
    assert all(r["attempts"] == 1 for r in letters.values())
    assert handler.attempts(6) == [1]


async def test_max_attempts_and_backoff_are_the_handlers_own(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The consumer's max_attempts wins over the setting (5 here), and its backoff decides
    the delay: an hour after the second failure, so that message waits, parked."""
    setup(db)
    handler = Scripted()
    ids = produce(db, {"seq": 0, "do": "value", "until": 9}, {"seq": 1, "do": "value", "until": 1})
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
                        max_attempts=2, backoff=lambda n: 0.0 if n < 2 else 3600.0)  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: list(dead(db)) == [ids[0]], what="dead after two attempts")
        await await_for(lambda: handler.attempts(1) == [1, 2], what="the other retried once")
        await await_for(lambda: unfinished(db, GROUP) == 0, what="its success written")
    assert handler.attempts(0) == [1, 2]
    row = dead(db)[ids[0]]
    assert row["attempts"] == 2
    assert row["reason"] == "ValueError: not declared retriable (attempt 2 of 2)"


async def test_a_backoff_of_an_hour_keeps_the_message_parked(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    handler = Scripted()
    (first,) = produce(db, {"seq": 0, "do": "value", "until": 9})
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn,
                        backoff=lambda attempt: 3600.0)  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: parked(db, GROUP), what="parked for its retry")
        rows = parked(db, GROUP)
        (marker,) = produce(db, {"seq": 1, "do": "ok"}, key="other")
        await await_for(lambda: handler.attempts(1) == [1], what="another key goes on")
    assert [(r["id"], r["attempts"], r["waiting"]) for r in rows] == [(first, 1, True)]
    assert handler.attempts(0) == [1]
    assert marker not in dead(db)


# -- typed payloads ---------------------------------------------------------------------------


class Order(pydantic.BaseModel):
    order_id: uuid.UUID
    total: Decimal


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


class Typed:
    def __init__(self) -> None:
        self.orders: list[Order] = []
        self.called = 0

    async def __call__(self, message: Message[Order]) -> None:
        self.called += 1
        self.orders.append(message.payload)


async def test_a_typed_handler_gets_validated_objects_and_bad_payloads_are_dead_at_once(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """Same key: the invalid payload between two good ones is dead-lettered on its first
    delivery (never retried, though max_attempts is 5) and the key goes on after it."""
    setup(db)
    handler = Typed()
    good = Order(order_id=uuid.uuid4(), total=Decimal("12.30"))
    msgs = [OutgoingMessage("k", good), OutgoingMessage("k", {"order_id": "not-a-uuid"}),
            OutgoingMessage("k", {"order_id": str(uuid.uuid4()), "total": "1"})]  # fmt: skip
    ids = [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: len(handler.orders) == 2, what="both good orders handled")
        await await_for(lambda: unfinished(db, GROUP) == 0, what="results written")
    assert handler.called == 2
    assert handler.orders[0] == good and isinstance(handler.orders[1], Order)
    assert handler.orders[1].total == Decimal("1")
    row = dead(db)[ids[1]]
    assert row["attempts"] == 1
    assert row["reason"].startswith("payload does not validate as Order: ")
    assert "order_id" in row["reason"] and "total" in row["reason"]
    assert "not-a-uuid" not in row["reason"]  # payloads stay out of reasons


async def test_a_transactional_handler_gets_a_dataclass_and_its_dead_letter(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    setup(db)
    seen: list[Line] = []

    async def handle(message: Message[Line], tx: Any) -> None:
        if message.payload.quantity == 0:
            raise DeadLetter("nothing to ship")
        seen.append(message.payload)

    msgs = [OutgoingMessage("k", {"sku": "a", "quantity": 2}),
            OutgoingMessage("k", {"sku": "b", "quantity": 0}),
            OutgoingMessage("k", {"sku": "c"})]  # fmt: skip
    ids = [e.id for e in enqueue_many_sync(db, TOPIC, msgs)]
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handle, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: len(dead(db)) == 2, what="two dead letters")
        await await_for(lambda: unfinished(db, GROUP) == 0, what="results written")
    assert seen == [Line("a", 2)]
    letters = dead(db)
    assert letters[ids[1]]["reason"] == "nothing to ship"
    assert letters[ids[2]]["reason"].startswith("payload does not validate as Line: quantity")
    assert {r["attempts"] for r in letters.values()} == {1}


class Unwritable:
    """Fails with text PostgreSQL cannot store (a NUL, a lone surrogate) for `bad` keys."""

    def __init__(self) -> None:
        self.deliveries: list[Message[Any]] = []

    async def __call__(self, message: Message[Any]) -> None:
        self.deliveries.append(message)
        if message.payload["do"] == "nul":
            raise ValueError("bytes b'\x00\x01' in the order")
        if message.payload["do"] == "surrogate":
            raise ValueError("name \udcff is not UTF-8")


async def test_an_error_text_the_database_cannot_store_is_recorded_cleaned(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A handler's error goes into the parked queue or the dead letters as text; a NUL or
    a lone surrogate in it would make the database (or the driver) refuse the whole round
    of results. Such characters are escaped, and the other messages are acked."""
    setup(db)
    handler = Unwritable()
    ids = produce(db, {"do": "nul"}, {"do": "surrogate"}, *({"do": "ok"} for _ in range(5)))
    consumer = Consumer(settings(max_attempts=1), group=GROUP, topic=TOPIC, handler=handler,
                        dsn=dsn)  # fmt: skip
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: unfinished(db, GROUP) == 0, what="every message finished")
    letters = dead(db)
    assert sorted(letters) == ids[:2]
    assert letters[ids[0]]["reason"].startswith("ValueError: bytes b'\\x00\x01' in the order")
    assert letters[ids[1]]["reason"].startswith("ValueError: name \\udcff is not UTF-8")
    assert len(handler.deliveries) == 7


async def test_a_result_the_database_refuses_is_dead_lettered_and_holds_back_nothing(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A write the database refuses for one message (here a trigger of the operator's on
    the parked queue rejects its key's retry) must not hold back the results beside it,
    nor run its handler again and again: it is dead-lettered with the database's reason."""
    setup(db)
    db.execute(
        """
        CREATE FUNCTION public.refuse_key() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.key = 'refused0' THEN RAISE EXCEPTION 'parking % is not allowed', NEW.key
                USING ERRCODE = 'P0001'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_key BEFORE INSERT ON pgcg.parked
            FOR EACH ROW EXECUTE FUNCTION public.refuse_key();
        """
    )
    handler = Scripted()
    (refused,) = produce(db, {"seq": 0, "do": "transient", "until": 9}, key="refused")
    others = produce(db, *({"seq": i, "do": "ok"} for i in range(1, 6)))
    consumer = Consumer(settings(), group=GROUP, topic=TOPIC, handler=handler, dsn=dsn)
    async with running(consumer):
        assign(db, GROUP, TOPIC, [0], consumer.member_id)
        await await_for(lambda: refused in dead(db), what="the refused message dead-lettered")
        await await_for(lambda: unfinished(db, GROUP) == 0, what="every message finished")
    reason = dead(db)[refused]["reason"]
    assert "parking refused0 is not allowed" in reason and "Transient: try again" in reason
    assert handler.attempts(0) == [1]
    assert all(handler.attempts(i) == [1] for i in range(1, 6))
    assert len(others) == 5
