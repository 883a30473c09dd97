"""What becomes of a delivery once its handler returned or raised: a pure decision.

A handler steers its message with exceptions: `raise Retry(after=30)` asks for another
delivery in 30 s, `raise DeadLetter("reason")` sets it aside at once, and any other
exception is retried with backoff (or dead-lettered, per the handler's `retry_on` and
`dead_letter_on`) until `max_attempts` deliveries failed. `outcome()` turns one delivery's
result into what the consumer records; it does no I/O, so every rule is tested alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# Seconds to wait before the next delivery, given the number of the delivery that failed.
Backoff = Callable[[int], float]
ExceptionTypes = tuple[type[BaseException], ...]


class Retry(Exception):
    """Raise from a handler to have the message delivered again.

    `after`: seconds until the next delivery; None leaves it to the handler's backoff.
    The failed delivery counts as an attempt: past `max_attempts` the message is
    dead-lettered instead.
    """

    def __init__(self, after: float | None = None, reason: str = "") -> None:
        if after is not None and (
            not isinstance(after, int | float) or not math.isfinite(after) or after < 0
        ):
            raise ValueError(f"Retry(after=...) takes finite seconds >= 0, not {after!r}")
        default = "retry requested" if after is None else f"retry requested in {after:g}s"
        super().__init__(reason or default)
        self.after = None if after is None else float(after)
        self.reason = reason


class DeadLetter(Exception):
    """Raise from a handler to move the message to the dead letters at once, with
    `reason` as its recorded error; it is never retried (`pgcg dlq replay` brings it back)."""

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("DeadLetter needs a reason: what an operator should read")
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Outcome:
    """`ack`: done. `retry`: deliver again in `delay` seconds. `dead_letter`: set aside.
    `reason` says why a delivery failed (empty for an ack)."""

    kind: Literal["ack", "retry", "dead_letter"]
    delay: float = 0.0
    reason: str = ""

    @property
    def acked(self) -> bool:
        return self.kind == "ack"

    @property
    def retried(self) -> bool:
        return self.kind == "retry"

    @property
    def dead_lettered(self) -> bool:
        return self.kind == "dead_letter"


ACK = Outcome("ack")


def describe(exc: BaseException) -> str:
    """The error text recorded with a failed delivery."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def outcome(
    exc: Exception | None,
    *,
    attempt: int,
    max_attempts: int,
    retry_on: ExceptionTypes = (Exception,),
    dead_letter_on: ExceptionTypes = (),
    backoff: Backoff,
) -> Outcome:
    """What to do after delivery number `attempt` (1-based) ended with `exc` (None: the
    handler returned).

    In order: no exception acks; DeadLetter (also a payload that failed validation)
    dead-letters at once; an exception of `dead_letter_on` dead-letters at once, even if
    `retry_on` matches too; Retry and exceptions of `retry_on` retry (after Retry's
    `after`, else `backoff(attempt)`) unless this was the last attempt, when they
    dead-letter; anything else dead-letters at once (it was not declared retriable).
    """
    if attempt < 1 or max_attempts < 1:
        raise ValueError("attempt and max_attempts count deliveries from 1")
    if exc is None:
        return ACK
    if isinstance(exc, DeadLetter):
        return Outcome("dead_letter", reason=exc.reason)
    reason = describe(exc)
    if dead_letter_on and isinstance(exc, dead_letter_on):
        return Outcome("dead_letter", reason=reason)
    if not isinstance(exc, Retry) and not isinstance(exc, retry_on):
        return Outcome("dead_letter", reason=f"{reason} (not retried: not in retry_on)")
    if attempt >= max_attempts:
        return Outcome("dead_letter", reason=f"{reason} (attempt {attempt} of {max_attempts})")
    delay = exc.after if isinstance(exc, Retry) and exc.after is not None else backoff(attempt)
    if not math.isfinite(delay) or delay < 0:
        raise ValueError(f"backoff({attempt}) gave {delay!r}: it must be finite seconds >= 0")
    return Outcome("retry", delay=float(delay), reason=reason)
