"""What becomes of a delivery: every rule of consumer/outcomes.py, as properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcg import DeadLetter, PayloadValidationError, Retry
from pgcg.consumer.outcomes import outcome


class Transient(Exception):
    pass


class Broken(Exception):
    pass


class Unexpected(Exception):
    pass


def backoff(attempt: int) -> float:
    return 0.5 * attempt


attempts = st.integers(1, 50).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m)))
delays = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
reasons = st.text(min_size=1).filter(str.strip)


def decide(exc: Exception | None, attempt: int, max_attempts: int, **kw: object):
    return outcome(exc, attempt=attempt, max_attempts=max_attempts, backoff=backoff, **kw)  # type: ignore[arg-type]


@given(attempts)
def test_a_return_acks(am: tuple[int, int]) -> None:
    result = decide(None, *am)
    assert result.acked and not result.retried and not result.dead_lettered


@given(attempts, reasons)
def test_dead_letter_is_at_once_with_its_reason(am: tuple[int, int], reason: str) -> None:
    result = decide(DeadLetter(reason), *am, retry_on=(Exception,))
    assert result.dead_lettered and result.reason == reason


@given(attempts)
def test_a_payload_that_fails_validation_is_never_retried(am: tuple[int, int]) -> None:
    result = decide(PayloadValidationError("payload does not validate as Order: x"), *am)
    assert result.dead_lettered and "does not validate" in result.reason


@given(attempts, st.one_of(st.none(), delays))
def test_retry_waits_as_asked_until_the_last_attempt(
    am: tuple[int, int], after: float | None
) -> None:
    attempt, max_attempts = am
    result = decide(Retry(after=after), attempt, max_attempts)
    if attempt >= max_attempts:
        assert result.dead_lettered
        assert f"attempt {attempt} of {max_attempts}" in result.reason
    else:
        assert result.retried
        assert result.delay == (backoff(attempt) if after is None else after)


@given(attempts, st.sampled_from([Transient, Broken, Unexpected]), st.booleans())
def test_declared_exceptions_decide(
    am: tuple[int, int], kind: type[Exception], also_retry_broken: bool
) -> None:
    attempt, max_attempts = am
    retry_on = (Transient, Broken) if also_retry_broken else (Transient,)
    result = decide(
        kind("boom"), attempt, max_attempts, retry_on=retry_on, dead_letter_on=(Broken,)
    )
    assert result.reason.startswith(f"{kind.__name__}: boom")
    if kind is Broken:  # dead_letter_on wins over retry_on
        assert result.dead_lettered
    elif kind is Unexpected:  # not declared retriable
        assert result.dead_lettered and "not in retry_on" in result.reason
    elif attempt < max_attempts:
        assert result.retried and result.delay == backoff(attempt)
    else:
        assert result.dead_lettered


@given(attempts, st.sampled_from([ValueError, KeyError, OSError, TimeoutError]))
def test_by_default_every_exception_is_retried(am: tuple[int, int], kind: type) -> None:
    attempt, max_attempts = am
    result = decide(kind("x"), attempt, max_attempts)
    assert result.retried == (attempt < max_attempts)
    assert result.dead_lettered == (attempt >= max_attempts)


@given(attempts, st.one_of(st.none(), st.builds(Exception, st.text())))
def test_an_outcome_is_exactly_one_thing(am: tuple[int, int], exc: Exception | None) -> None:
    result = decide(exc, *am)
    assert [result.acked, result.retried, result.dead_lettered].count(True) == 1
    assert math.isfinite(result.delay) and result.delay >= 0


@pytest.mark.parametrize("after", [-1, math.inf, math.nan, "5"])
def test_retry_refuses_a_delay_that_is_no_delay(after: object) -> None:
    with pytest.raises(ValueError, match="finite seconds"):
        Retry(after=after)  # type: ignore[arg-type]


def test_dead_letter_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        DeadLetter("  ")


def test_a_broken_backoff_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="backoff"):
        outcome(Exception(), attempt=1, max_attempts=3, backoff=lambda a: -1.0)
