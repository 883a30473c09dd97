"""Loading the user's handler, calling it, and the retry schedule for failures."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.to_thread
from tenacity import wait_random_exponential

from pgcg.consumer.message import Message
from pgcg.shared.errors import HandlerLoadError

Handler = Callable[..., Any]


def load(spec: str) -> Handler:
    """`package.module:function` -> the callable. Errors say exactly what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"--handler {spec!r} must look like package.module:function")
    if "" not in sys.path and "." not in sys.path:
        # A handler next to where the user runs `pgcg consumer` should just work.
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerLoadError(
            f"cannot import handler module {module_name!r}: {exc}. Is the package "
            "installed, or the module in the current directory?"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise HandlerLoadError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(target):
        raise HandlerLoadError(f"handler {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def wants_transaction(handler: Handler) -> bool:
    """A handler declared as handle(message, tx) runs in transactional mode."""
    try:
        params = [
            p
            for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - callable objects too
    )


async def call(handler: Handler, message: Message, *extra: Any) -> None:
    """Run an async handler in this task, a sync one in a worker thread."""
    if is_async(handler):
        result: Awaitable[Any] = handler(message, *extra)
        await result
        return
    result = await anyio.to_thread.run_sync(partial(handler, message, *extra))
    if inspect.isawaitable(result):
        await result


def caller(handler: Handler) -> Callable[[Message], Awaitable[None]]:
    """`call` bound to one handler, with the async-or-thread decision made once."""
    if is_async(handler):
        return handler  # type: ignore[no-any-return]
    return partial(call, handler)


class RetryPolicy:
    """Exponential backoff with full jitter, capped; the schedule is tenacity's."""

    def __init__(self, max_attempts: int, base: float, cap: float) -> None:
        self.max_attempts = max_attempts
        self._wait = wait_random_exponential(multiplier=base, max=cap)

    def exhausted(self, attempt: int) -> bool:
        """Whether a failure of delivery number `attempt` (1-based) is the last one."""
        return attempt >= self.max_attempts

    def delay(self, attempt: int) -> float:
        """Seconds before the next delivery after delivery `attempt` failed."""
        return float(self._wait(SimpleNamespace(attempt_number=attempt)))  # type: ignore[arg-type]
