"""A recorded history of a run, and the checker over it (demo, chaos runs, tests).

The producer writes each message's (seq, key) in the same transaction as the enqueue, so
the produced table is exactly what was committed. The recording handler journals every
handling (message, key, seq, member, epoch, start, end) in its own transaction, which
survives the handler's process dying afterwards. The checker then proves:

- no loss: every produced message was handled (or is still pending / dead-lettered);
- key order: no message was handled after a later message of its key had finished;
- no concurrency per key: the accepted handling of each message (its last journal row: a
  handling whose ack took effect is never redelivered) never overlaps another accepted
  handling of the same key. Overlaps with superseded handlings are zombie work that the
  epoch fence rejected; they are counted, as are duplicates.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

from pgcg.consumer.message import Message
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries

Q = Queries("journal")

# Simulated work per message in the recording handler (milliseconds).
WORK_ENV = "PGCG_JOURNAL_WORK_MS"

_conn: psycopg.AsyncConnection[Any] | None = None
_conn_lock: anyio.Lock | None = None


def create(conn: psycopg.Connection[Any]) -> None:
    conn.execute(Q.create)


async def record(message: Message) -> None:
    """Handler: journal this handling. `pgcg consumer --handler pgcg.shared.journal:record`."""
    global _conn, _conn_lock
    started = datetime.now(UTC)
    work_ms = float(os.environ.get(WORK_ENV, "0") or 0)
    if work_ms:
        await anyio.sleep(work_ms / 1000)
    finished = datetime.now(UTC)
    if _conn_lock is None:
        _conn_lock = anyio.Lock()
    async with _conn_lock:
        if _conn is None or _conn.closed:
            _conn = await psycopg.AsyncConnection.connect(
                os.environ["PGCG_DATABASE_URL"], autocommit=True
            )
        await _conn.execute(
            Q.record,
            {
                "message_id": message.id,
                "key": message.key,
                "seq": int(message.payload["seq"]),
                "partition": message.partition,
                "member_id": message.member_id,
                "epoch": message.epoch,
                "attempt": message.attempt,
                "pid": os.getpid(),
                "started_at": started,
                "finished_at": finished,
            },
        )


class Producer(threading.Thread):
    """Enqueues `rate` messages a second over `keys` keys until stopped (or `limit`)."""

    def __init__(
        self, dsn: str, topic: str, *, keys: int, rate: float, limit: int | None = None
    ) -> None:
        super().__init__(daemon=True, name="pgcg-journal-producer")
        self.dsn, self.topic, self.keys, self.rate, self.limit = dsn, topic, keys, rate, limit
        self.stop_event = threading.Event()
        self.produced = 0
        self.errors = 0

    def run(self) -> None:
        batch = max(1, int(self.rate / 20))
        conn: psycopg.Connection[Any] | None = None
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            if self.limit is not None and self.produced >= self.limit:
                return
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, row_factory=dict_row)
                    start = conn.execute(Q.max_seq).fetchone()["seq"] + 1  # type: ignore[index]
                    conn.commit()
                    seq = start
                n = batch if self.limit is None else min(batch, self.limit - self.produced)
                seqs = list(range(seq, seq + n))
                keys = [f"key-{s % self.keys}" for s in seqs]
                with conn.transaction():
                    done = enqueue_many_sync(
                        conn,
                        self.topic,
                        [OutgoingMessage(k, {"seq": s}) for s, k in zip(seqs, keys, strict=True)],
                    )
                    conn.execute(
                        Q.produced, {"seqs": seqs, "keys": keys, "ids": [d.id for d in done]}
                    )
                seq += n
                self.produced += n
            except Exception:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.stop_event.wait(0.2)
                continue
            next_at += n / self.rate
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


@dataclass
class Verdict:
    produced: int = 0
    handled: int = 0  # distinct messages with an accepted handling
    pending: int = 0
    dead_lettered: int = 0
    lost: list[int] = field(default_factory=list)  # seqs
    order_violations: list[str] = field(default_factory=list)
    concurrent_violations: list[str] = field(default_factory=list)
    duplicates: int = 0  # extra handlings (after a crash or forced hand-off)
    fenced_overlaps: int = 0  # zombie work overlapping the new owner's, rejected at ack

    @property
    def ok(self) -> bool:
        return not (self.lost or self.order_violations or self.concurrent_violations)

    def summary(self) -> str:
        return (
            f"produced={self.produced} handled={self.handled} pending={self.pending} "
            f"dead={self.dead_lettered} lost={len(self.lost)} "
            f"order_violations={len(self.order_violations)} "
            f"concurrent_violations={len(self.concurrent_violations)} "
            f"duplicates={self.duplicates} fenced_overlaps={self.fenced_overlaps}"
        )


def check(conn: psycopg.Connection[Any], topic: str) -> Verdict:
    conn.row_factory = dict_row  # type: ignore[assignment]
    produced = {r["seq"]: r["key"] for r in conn.execute(Q.produced_rows)}
    rows = conn.execute(Q.journal_rows).fetchall()
    depth = conn.execute(Q.queue_depth, {"topic": topic}).fetchone() or {}
    verdict = Verdict(
        produced=len(produced), pending=depth.get("pending", 0), dead_lettered=depth.get("dead", 0)
    )
    by_seq: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_seq[r["seq"]].append(r)
    accepted = {seq: handlings[-1] for seq, handlings in by_seq.items()}
    verdict.handled = len(accepted)
    verdict.duplicates = sum(len(h) - 1 for h in by_seq.values())
    if verdict.pending == 0 and verdict.dead_lettered == 0:
        verdict.lost = sorted(s for s in produced if s not in accepted)

    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_key[r["key"]].append(r)
    for key, handlings in by_key.items():
        handlings.sort(key=lambda r: r["started_at"])
        # Order: nothing of a lower seq starts after a higher seq of the key has finished.
        highest_done: dict[str, Any] | None = None
        for r in handlings:
            if (
                highest_done is not None
                and r["seq"] < highest_done["seq"]
                and (r["started_at"] > highest_done["finished_at"])
            ):
                verdict.order_violations.append(
                    f"{key}: seq {r['seq']} handled at {r['started_at']:%T.%f} after seq "
                    f"{highest_done['seq']} finished at {highest_done['finished_at']:%T.%f}"
                )
            if highest_done is None or r["seq"] > highest_done["seq"]:
                highest_done = r
        # Concurrency: accepted handlings of one key never overlap.
        for a, b in itertools.pairwise(handlings):
            if b["started_at"] >= a["finished_at"]:
                continue
            both_accepted = accepted[a["seq"]] is a and accepted[b["seq"]] is b
            if both_accepted:
                verdict.concurrent_violations.append(
                    f"{key}: seq {a['seq']} ({a['member_id']} epoch {a['epoch']}) overlaps seq "
                    f"{b['seq']} ({b['member_id']} epoch {b['epoch']})"
                )
            else:
                verdict.fenced_overlaps += 1
    return verdict
