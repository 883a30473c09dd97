"""Typed payloads on the consumer side: a payload (decoded JSON) validated into the type a
handler declares, or a PayloadValidationError that says why not.

A handler declares its type as `message: Message[Order]` (or the consumer is given
`payload_type=Order`); the consumer's workers validate each payload just before the
handler runs; Order may be a pydantic model, a dataclass, or anything pydantic can
validate (list[Order], a TypedDict, ...). Values come back from the encoding the producer
uses (docs/api.md, "Payload encoding"): ISO 8601 strings become datetime and date, UUID
strings UUID, decimal strings Decimal. A payload that does not validate can never succeed
on a later attempt, so PayloadValidationError is a DeadLetter: dead-lettered at once.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import pydantic

from pgcg.consumer.message import Message
from pgcg.consumer.outcomes import DeadLetter


class PayloadValidationError(DeadLetter):
    """The payload does not validate as the declared type. `errors` are pydantic's
    structured errors (location, message, type) for whoever wants more than the text."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(reason)
        self.errors = errors or []


def declared_type(annotation: Any) -> Any | None:
    """The payload type an annotation declares: Order for `Message[Order]`, the model
    itself for a model; None for a bare `Message`, `Message[Any]` or no annotation."""
    if annotation is inspect.Parameter.empty or annotation is None or annotation is Any:
        return None
    if annotation is Message:
        return None
    if typing.get_origin(annotation) is Message:
        (payload_type,) = typing.get_args(annotation)
        return None if payload_type is Any else payload_type
    return annotation


def handler_payload_type(handler: Callable[..., Any]) -> Any | None:
    """The payload type declared by the annotation of a handler's first parameter."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    target = handler if inspect.isroutine(handler) else type(handler).__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that cannot be resolved: treat as undeclared
        return None
    return declared_type(hints.get(params[0].name, inspect.Parameter.empty))


@functools.lru_cache(maxsize=256)
def _adapter(payload_type: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(payload_type)


def _name(payload_type: Any) -> str:
    return getattr(payload_type, "__qualname__", None) or repr(payload_type)


def decode(payload: Any, payload_type: Any) -> Any:
    """`payload` validated as `payload_type` (or as the type `Message[T]` declares).

    Returns the payload unchanged when nothing is declared; raises
    PayloadValidationError with pydantic's message when it does not validate (which
    never quotes the payload's values: payloads stay out of logs and dead-letter reasons).
    """
    target = declared_type(payload_type)
    if target is None:
        return payload
    try:
        adapter = _adapter(target)
    except TypeError:  # unhashable annotations: build one for this call
        adapter = pydantic.TypeAdapter(target)
    try:
        return adapter.validate_python(payload)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise PayloadValidationError(
            f"payload does not validate as {_name(target)}: {_summary(errors)}", errors
        ) from None


def _summary(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error["loc"]) or "payload"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
