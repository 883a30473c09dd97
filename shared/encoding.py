"""The one JSON encoding of payloads, whatever the producer was given.

  pydantic model   its fields by alias (model_dump), each value encoded by these rules
  dataclass        an object of its fields
  datetime         ISO 8601 with its UTC offset, "2026-03-01T12:30:00.250000+01:00";
                   a naive datetime is refused: it means different instants on different hosts
  date             ISO 8601, "2026-03-01"
  UUID             its canonical string, "0b7c…-…"
  Decimal          a string, "12.30": every digit kept (a JSON number is a float to most
                   readers); NaN and infinities are refused, like float ones
  Enum             its value
  tuple            an array; dict keys must be strings

Nesting works at any depth. The consumer validates it back with consumer/payloads.py, so
`decode(json.loads(encode(x)), type(x)) == x` for these types.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from decimal import Decimal
from typing import Any

import pydantic


def _default(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="python", by_alias=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            raise ValueError(
                f"datetime {value.isoformat()} has no time zone; attach one "
                "(datetime.now(UTC), or .replace(tzinfo=...)) so every reader sees one instant"
            )
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"Decimal {value} is not a finite number")
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(
        f"Object of type {type(value).__name__} is not JSON serializable (supported beyond "
        "JSON: pydantic models, dataclasses, datetime, date, UUID, Decimal, Enum)"
    )


# One encoder for every payload: json.dumps() with non-default options builds a new
# JSONEncoder per call, a quarter of the cost of encoding a small payload. `default` is
# only called for values JSON has no type for, so plain payloads pay nothing for it.
encode = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=_default).encode
