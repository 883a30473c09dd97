"""Typed payloads: one JSON encoding on the producer side (shared/encoding.py), validated
back into the declared type on the consumer side (consumer/payloads.py)."""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcg.consumer.message import Message
from pgcg.consumer.payloads import (
    PayloadValidationError,
    declared_type,
    decode,
    handler_payload_type,
)
from pgcg.shared.encoding import encode
from pgcg.shared.errors import InvalidInput
from pgcg.shared.producer import OutgoingMessage, _params, enqueue_many_sync
from tests.logclient import logged


class Status(enum.Enum):
    OPEN = "open"
    PAID = "paid"


@dataclasses.dataclass(frozen=True)
class Line:
    sku: uuid.UUID
    price: Decimal
    quantity: int


class Order(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, populate_by_name=True)

    order_id: uuid.UUID = pydantic.Field(alias="orderId")
    placed_at: datetime
    ship_on: date
    total: Decimal
    status: Status
    lines: tuple[Line, ...]
    note: str | None = None


def wire(value: Any) -> Any:
    """What a consumer sees: the producer's JSON, as jsonb hands it back."""
    return json.loads(encode(value))


offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(min_value=datetime(1000, 1, 1), timezones=offsets)
decimals = st.decimals(allow_nan=False, allow_infinity=False, places=4)
lines = st.builds(Line, sku=st.uuids(), price=decimals, quantity=st.integers(-(2**53), 2**53))
orders = st.builds(
    Order,
    order_id=st.uuids(),
    placed_at=aware,
    ship_on=st.dates(),
    total=decimals,
    status=st.sampled_from(Status),
    lines=st.lists(lines, max_size=3).map(tuple),
    note=st.one_of(st.none(), st.text()),
)


@given(orders)
def test_a_model_round_trips_exactly(order: Order) -> None:
    back = decode(wire(order), Order)
    assert back == order
    assert back.placed_at.utcoffset() == order.placed_at.utcoffset()
    assert str(back.total) == str(order.total)  # every digit, trailing zeros too


@given(lines)
def test_a_dataclass_round_trips(line: Line) -> None:
    assert decode(wire(line), Line) == line


@given(st.lists(orders, max_size=2))
def test_message_of_a_list_round_trips(batch: list[Order]) -> None:
    assert decode(wire(batch), Message[list[Order]]) == batch


def test_the_encoding_is_the_documented_one() -> None:
    order = Order(
        orderId=uuid.UUID("0b7c5e1e-8a5f-4f4e-9a43-6f1d2c3b4a59"),
        placed_at=datetime(2026, 3, 1, 12, 30, 0, 250000, tzinfo=timezone(timedelta(hours=1))),
        ship_on=date(2026, 3, 2),
        total=Decimal("12.30"),
        status=Status.PAID,
        lines=(Line(uuid.UUID(int=1), Decimal("0.10"), 3),),
    )
    assert wire(order) == {
        "orderId": "0b7c5e1e-8a5f-4f4e-9a43-6f1d2c3b4a59",
        "placed_at": "2026-03-01T12:30:00.250000+01:00",
        "ship_on": "2026-03-02",
        "total": "12.30",
        "status": "paid",
        "lines": [{"sku": "00000000-0000-0000-0000-000000000001", "price": "0.10", "quantity": 3}],
        "note": None,
    }
    # Plain JSON payloads are untouched by the typed encoding.
    assert encode({"a": [1, 2.5, "x", None, True]}) == '{"a":[1,2.5,"x",null,true]}'


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"at": datetime(2026, 1, 1)}, "has no time zone"),
        ({"total": Decimal("NaN")}, "not a finite number"),
        ({"total": Decimal("-Infinity")}, "not a finite number"),
        ({"tags": {1, 2}}, "not JSON serializable"),
        (Line(uuid.uuid4(), Decimal("1"), 1).__class__, "not JSON serializable"),
    ],
)
def test_what_has_no_single_encoding_is_refused_before_sending(payload: Any, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        _params("orders", [OutgoingMessage("k", payload)], 1 << 20)


def test_nul_inside_a_model_is_refused_up_front() -> None:
    @dataclasses.dataclass
    class Note:
        text: str

    with pytest.raises(InvalidInput, match="NUL"):
        _params("orders", [OutgoingMessage("k", Note("a\x00b"))], 1 << 20)


def test_params_keep_their_shape() -> None:
    params = _params(
        "orders", [OutgoingMessage("k", Line(uuid.UUID(int=2), Decimal("2.50"), 1))], 1 << 20
    )
    assert set(params) == {"topic", "keys", "payloads", "headers", "dedup_keys", "delays_ms"}
    assert params["payloads"] == [
        '{"sku":"00000000-0000-0000-0000-000000000002","price":"2.50","quantity":1}'
    ]


def test_a_payload_that_does_not_validate_says_where_and_why_but_not_what() -> None:
    bad = {**wire(_order()), "total": "twelve", "placed_at": "secret-value-42"}
    with pytest.raises(PayloadValidationError) as caught:
        decode(bad, Message[Order])
    reason = caught.value.reason
    assert reason.startswith("payload does not validate as Order: ")
    assert "total:" in reason and "placed_at:" in reason
    assert "secret-value-42" not in reason and "twelve" not in reason
    assert {tuple(e["loc"]) for e in caught.value.errors} == {("total",), ("placed_at",)}


def _order() -> Order:
    return Order(
        order_id=uuid.uuid4(),
        placed_at=datetime.now(UTC),
        ship_on=date.today(),
        total=Decimal("1.00"),
        status=Status.OPEN,
        lines=(),
    )


async def typed_handler(message: Message[Order]) -> None: ...


def untyped_handler(message: Message) -> None: ...  # type: ignore[type-arg]


def bare_handler(message) -> None: ...  # type: ignore[no-untyped-def]


class CallableHandler:
    def __call__(self, message: Message[Line]) -> None: ...


def test_the_declared_type_comes_from_the_handler_signature() -> None:
    assert handler_payload_type(typed_handler) is Order
    assert handler_payload_type(CallableHandler()) is Line
    assert handler_payload_type(untyped_handler) is None
    assert handler_payload_type(bare_handler) is None
    assert declared_type(Message[Any]) is None
    assert declared_type(Order) is Order
    assert decode({"anything": 1}, Message) == {"anything": 1}


def test_a_typed_payload_is_stored_as_its_json(db: psycopg.Connection[Any], dsn: str) -> None:
    db.execute("SELECT pgcg.create_topic('orders', 2)")
    order = _order()
    with psycopg.connect(dsn) as conn:
        enqueue_many_sync(conn, "orders", [OutgoingMessage("k", order)])
    (row,) = logged(db, "orders")
    assert decode(row["payload"], Order) == order
