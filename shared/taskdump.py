"""Where every task of a running process waits, on request: `kill -USR1 <pid>` logs one
record per asyncio task with the chain of awaits it is suspended in (a statement on its
connection, an event, a sleep).

A consumer that keeps heartbeating while one of its loops waits on something that never
comes holds its partitions and does nothing; its logs say nothing either, because a loop
that waits has nothing to report. This answers "what is it waiting on?" without a
debugger or a restart. Thread stacks (py-spy, faulthandler) show only the event loop's
select(); the awaits are in the coroutines, which this walks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger("pgcg.tasks")

# Not on every platform (Windows has none): there, no dump.
SIGNAL: signal.Signals | None = getattr(signal, "SIGUSR1", None)


def install() -> None:
    """Log every task's awaits each time the process gets SIGUSR1, from now on.

    Installed once and never taken back (idempotent): SIGUSR1's default action ends the
    process, so a handler that came and went with a task group would leave the start (a
    connect, a join that hangs: when an operator most wants a dump) and the shutdown
    open to it. The handler runs in the main thread between bytecodes and only schedules
    the dump on the running event loop.
    """
    if SIGNAL is None or signal.getsignal(SIGNAL) is _on_signal:
        return
    signal.signal(SIGNAL, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.warning("no event loop is running yet: no tasks to show",
                    extra={"action": "task_stack", "task": None, "stack": ""})  # fmt: skip
        return
    loop.call_soon_threadsafe(log_tasks)


def log_tasks() -> int:
    """One WARNING record per asyncio task of the running loop: its name and awaits,
    outermost first. Returns how many tasks were logged."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    for task in tasks:
        stack = "\n".join(_describe(frame) for frame in awaits(task.get_coro()))
        # A warning although nothing failed: it was asked for, and must show at any level.
        log.warning(
            "task %s waits in:\n%s", task.get_name(), stack or "(not started or finished)",
            extra={"action": "task_stack", "task": task.get_name(), "stack": stack},
        )  # fmt: skip
    return len(tasks)


def awaits(coro: Any) -> list[FrameType]:
    """The frames of a suspended coroutine and of everything it awaits, in turn."""
    frames = []
    while coro is not None:
        frame = _first(coro, "cr_frame", "gi_frame", "ag_frame")
        if frame is None:
            break
        frames.append(frame)
        coro = _first(coro, "cr_await", "gi_yieldfrom", "ag_await")
    return frames


def _first(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _describe(frame: FrameType) -> str:
    code = frame.f_code
    return f"  {code.co_qualname} ({code.co_filename}:{frame.f_lineno})"
