"""Loading the user's handler, calling it, and what becomes of its failures."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.to_thread
from tenacity import wait_random_exponential

from pgcg.consumer.message import Message
from pgcg.consumer.outcomes import Backoff, ExceptionTypes, Outcome, outcome
from pgcg.shared.errors import HandlerLoadError

log = logging.getLogger("pgcg.consumer.handlers")

Handler = Callable[..., Any]


def load(spec: str, search_path: Sequence[str] = (), *, option: str = "--handler") -> Any:
    """`package.module:function` -> the callable. Errors say exactly what is wrong.

    The module is imported from the installed packages, and from the folders of
    `search_path` (--handler-path) first when given. The current directory is not
    searched unless named there: a stray `json.py` or `handlers.py` wherever the consumer
    happens to start must not replace the code it was meant to run.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        what = "function" if option == "--handler" else "attribute"
        raise HandlerLoadError(f"{option} {spec!r} must look like package.module:{what}")
    for folder in reversed([os.path.abspath(f) for f in search_path]):
        if not os.path.isdir(folder):
            raise HandlerLoadError(f"--handler-path {folder!r} is not a directory")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = (
            f"the installed packages or {', '.join(map(repr, search_path))}"
            if search_path
            else "the installed packages (a module in a folder of your own needs "
            "--handler-path DIR, or PGCG_HANDLER_PATH)"
        )
        raise HandlerLoadError(
            f"cannot import handler module {module_name!r}: {exc}. Looked in {where}"
        ) from exc
    except (Exception, SystemExit) as exc:
        # The user's module itself failed: their traceback is what they need, one flag away.
        log.debug("handler module %s failed on import", module_name, exc_info=True,
                  extra={"action": "handler_import_failed"})  # fmt: skip
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise HandlerLoadError(
            f"handler module {module_name!r} raised {type(exc).__name__} on import"
            f"{': ' + reason if reason else ''} (--log-level DEBUG shows the traceback)"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise HandlerLoadError(f"module {module_name!r} has no attribute {attr!r}")
    if option == "--handler" and not callable(target):
        raise HandlerLoadError(f"handler {spec!r} is not callable")
    return target


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
    """What becomes of a failed delivery (outcomes.py's rules) for one handler: its
    `max_attempts`, which exceptions it retries or dead-letters at once, and its backoff
    (by default exponential with full jitter, capped: tenacity's schedule)."""

    def __init__(
        self,
        max_attempts: int,
        base: float,
        cap: float,
        *,
        retry_on: ExceptionTypes = (Exception,),
        dead_letter_on: ExceptionTypes = (),
        backoff: Backoff | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts counts deliveries from 1, not {max_attempts!r}")
        self.max_attempts = max_attempts
        self.retry_on = tuple(retry_on)
        self.dead_letter_on = tuple(dead_letter_on)
        self._wait = wait_random_exponential(multiplier=base, max=cap)
        self._backoff = backoff

    def exhausted(self, attempt: int) -> bool:
        """Whether a failure of delivery number `attempt` (1-based) is the last one."""
        return attempt >= self.max_attempts

    def delay(self, attempt: int) -> float:
        """Seconds before the next delivery after delivery `attempt` failed."""
        if self._backoff is not None:
            return float(self._backoff(attempt))
        return float(self._wait(SimpleNamespace(attempt_number=attempt)))  # type: ignore[arg-type]

    def outcome(self, exc: Exception | None, attempt: int) -> Outcome:
        """What to do after delivery `attempt` ended with `exc` (None: it returned)."""
        return outcome(
            exc,
            attempt=attempt,
            max_attempts=self.max_attempts,
            retry_on=self.retry_on,
            dead_letter_on=self.dead_letter_on,
            backoff=self.delay,
        )
