"""Batched producers for a bench run: one connection and thread each, started together.

The workload is split by key, so every key has a single producer and its order is the
order of the workload; the handlers' order check stays meaningful with several producers.
Threads are enough: a producer waits on the server most of the time, and its Python work
(encoding) overlaps the other producers' statements.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg

from pgcg.shared.db import connect_sync

T = TypeVar("T")


def split_by_key(
    items: Sequence[T], key_index: Callable[[int], int], producers: int
) -> list[list[T]]:
    slices: list[list[T]] = [[] for _ in range(producers)]
    for n, item in enumerate(items):
        slices[key_index(n) % producers].append(item)
    return slices


def run_producers(
    dsn: str,
    slices: list[list[T]],
    batch_size: int,
    send: Callable[[psycopg.Connection[Any], list[T]], object],
) -> float:
    """Send every slice in batches from its own connection; seconds from start to the last
    commit."""
    conns = [connect_sync(dsn) for _ in slices]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(slices) + 1)

    def produce(conn: psycopg.Connection[Any], items: list[T]) -> None:
        try:
            barrier.wait()
            for at in range(0, len(items), batch_size):
                send(conn, items[at : at + batch_size])
        except BaseException as exc:  # re-raised by the caller
            errors.append(exc)

    threads = [
        threading.Thread(target=produce, args=(conn, items), daemon=True)
        for conn, items in zip(conns, slices, strict=True)
    ]
    try:
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return elapsed
