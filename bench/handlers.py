"""Handlers the drain benchmark runs inside real `pgcg consumer` processes.

Each checks per-key order in process: payloads carry the producer's sequence number, and
a key's sequence must grow. No partition moves during a bench run, so every key lives in
exactly one process and an in-process check is exact; the bench still merges the key
sets afterwards to prove that. The bookkeeping is a dict lookup and a compare per
message, so it does not dominate even a no-op handler.

Counters go to `$PGCG_BENCH_REPORT_DIR/<pid>.json` when the process exits (the consumer
exits normally after SIGTERM, so atexit runs).
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio

from pgcg.consumer.message import Message

REPORT_DIR_ENV = "PGCG_BENCH_REPORT_DIR"


class OrderCheck:
    __slots__ = ("active", "duplicates", "first_at", "handled", "last", "last_at", "overlaps",
                 "violations")  # fmt: skip

    def __init__(self) -> None:
        self.last: dict[str, int] = {}  # key -> highest sequence handled
        self.active: set[str] = set()  # keys with a handler running right now
        self.handled = 0
        self.violations = 0  # a lower sequence after a higher one: order broken
        self.duplicates = 0  # the same sequence again: a redelivery (at-least-once)
        self.overlaps = 0  # two handlers of one key at the same time
        self.first_at = 0.0
        self.last_at = 0.0

    def begin(self, message: Message) -> None:
        key = message.key
        seq = message.payload["seq"]
        prev = self.last.get(key, -1)
        if seq < prev:
            self.violations += 1
        elif seq == prev:
            self.duplicates += 1
        else:
            self.last[key] = seq
        if key in self.active:
            self.overlaps += 1
        self.active.add(key)

    def end(self, message: Message) -> None:
        self.active.discard(message.key)
        self.handled += 1
        now = time.time()
        if not self.first_at:
            self.first_at = now
        self.last_at = now

    def report(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "handled": self.handled,
            "violations": self.violations,
            "duplicates": self.duplicates,
            "overlaps": self.overlaps,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "keys": sorted(self.last),
        }


CHECK = OrderCheck()


def _write_report() -> None:
    folder = os.environ.get(REPORT_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(CHECK.report()), encoding="utf-8")
    tmp.replace(path)


atexit.register(_write_report)


async def noop(message: Message) -> None:
    CHECK.begin(message)
    CHECK.end(message)


async def sleep1ms(message: Message) -> None:
    CHECK.begin(message)
    try:
        await anyio.sleep(0.001)
    finally:
        CHECK.end(message)


_failed_once: set[str] = set()


async def parked(message: Message) -> None:
    """A no-op, but a key's first delivery fails once: its retry parks the key, and the
    key's later messages, read meanwhile, follow it to the parked queue, as behind a
    poison message. The drain is then mostly the parked queue's."""
    if message.attempt == 1 and message.key not in _failed_once:
        _failed_once.add(message.key)
        raise RuntimeError("a key's first delivery fails once (bench: parks the key)")
    CHECK.begin(message)
    CHECK.end(message)


HANDLERS = {
    "noop": "pgcg.bench.handlers:noop",
    "sleep1ms": "pgcg.bench.handlers:sleep1ms",
    "parked": "pgcg.bench.handlers:parked",
}
