"""Small pieces every background loop uses: a wake-up signal and reconnect backoff."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from pgcg.shared.errors import DatabaseUnavailable


class Signal:
    """A level-triggered wake-up: set() any number of times, wait() returns once and resets.

    Loops wait on it with a timeout, so a missed set() only delays work, never loses it.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self, timeout: float | None = None) -> bool:
        """True if set, False on timeout."""
        if not self._event.is_set():
            if timeout is None or math.isinf(timeout):
                await self._event.wait()
            else:
                with anyio.move_on_after(max(timeout, 0)):
                    await self._event.wait()
        was_set = self._event.is_set()
        if was_set:
            self._event = anyio.Event()
        return was_set


def reconnecting(log: logging.Logger, what: str, **fields: object) -> AsyncRetrying:
    """Retry forever on DatabaseUnavailable, with full-jitter backoff up to 5 s.

    Giving up is the owner's decision (a lease that runs out, a shutdown), not this loop's.
    """

    def before_sleep(state: object) -> None:
        outcome = getattr(state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        log.warning(
            "%s: database unavailable, retrying: %s",
            what,
            exc,
            extra={"action": "db_retry", **fields},
        )

    return AsyncRetrying(
        retry=retry_if_exception_type(DatabaseUnavailable),
        wait=wait_random_exponential(multiplier=0.2, max=5.0),
        before_sleep=before_sleep,
        reraise=True,
    )


async def refresh_forever(
    refresh: Callable[[], Awaitable[None]],
    drop: Callable[[], Awaitable[None]],
    interval: float,
    log: logging.Logger,
) -> None:
    """Run `refresh` every `interval` until cancelled. A lost database only drops the
    connection (`drop`) until the next round: readings are best effort, never fatal."""
    try:
        while True:
            try:
                await refresh()
            except DatabaseUnavailable as exc:
                log.debug("lag refresh failed: %s", exc, extra={"action": "lag_failed"})
                await drop()
            await anyio.sleep(interval)
    finally:
        with anyio.CancelScope(shield=True):
            await drop()
