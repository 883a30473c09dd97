"""A minimal client of pgcg's SQL API for tests of the storage itself: it adopts, reads, marks
and settles the way a consumer does, one call at a time, so a test can interleave
producers, owners, hand-offs and upkeep exactly as it wants.

`nested_plans` runs a statement under auto_explain and returns the plans of every
statement the functions it calls ran, so plan checks reach inside pgcg's functions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgcg.shared.queries import Queries
from tests.plans import Plan

Q = Queries("consumer")


@dataclass
class Part:
    partition: int
    epoch: int
    done: int
    cur: int | None = None
    cur_offset: int | None = None
    finished: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Row:
    partition: int
    offset: int
    tick: int
    a_tick: int
    slot: int
    key: str
    payload: Any
    state: str

    @property
    def id(self) -> int:
        return self.offset * 1024 + self.partition


class Owner:
    """One member's view of the partitions it owns in a group."""

    def __init__(self, conn: psycopg.Connection[Any], group: str, member: str) -> None:
        self.conn = conn
        self.group = group
        self.member = member
        self.parts: dict[int, Part] = {}

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"group": self.group, "member": self.member, "topic": None, **extra}

    def adopt(self, partition: int, epoch: int, *, max_attempts: int = 5) -> dict[str, Any] | None:
        row = self.conn.execute(
            Q.adopt,
            self.params(partition=partition, epoch=epoch, max_attempts=max_attempts,
                        retry_delay_ms=0),
        ).fetchone()  # fmt: skip
        if row is None:
            self.parts.pop(partition, None)
            return None
        self.parts[partition] = Part(partition, epoch, row["tick"], finished=set(row["finished"]))
        return dict(row)

    def fetch(self, limit: int = 1000, limit_bytes: int = 1 << 30) -> list[Row]:
        """Read what is next; rows finished by the group (or skipped) are left out."""
        parts = sorted(self.parts.values(), key=lambda p: p.partition)
        if not parts:
            return []
        rows = self.conn.execute(
            Q.fetch,
            self.params(
                partitions=[p.partition for p in parts], done=[p.done for p in parts],
                cur=[p.cur for p in parts], cur_offsets=[p.cur_offset for p in parts],
                limit=limit, limit_bytes=limit_bytes,
            ),
        ).fetchall()  # fmt: skip
        out = []
        for r in rows:
            part = self.parts[r["partition"]]
            if r["state"] == "e":
                part.done = max(part.done, r["tick"])
                if part.cur is not None and part.cur <= part.done:
                    part.cur = part.cur_offset = None
                continue
            part.cur, part.cur_offset = r["tick"], r["offset"]
            if r["state"] == "s" or r["offset"] in part.finished:
                continue
            out.append(
                Row(r["partition"], r["offset"], r["tick"], r["a_tick"], r["slot"], r["key"],
                    r["payload"], r["state"])
            )  # fmt: skip
        return out

    def settle(
        self,
        *,
        start: Iterable[Row] = (),
        done: Iterable[Row] = (),
        park: Iterable[Row] = (),
        dead: Iterable[Row] = (),
        epoch: int | None = None,
    ) -> list[dict[str, Any]]:
        start, done, park, dead = list(start), list(done), list(park), list(dead)
        items = done + park + dead
        kinds = ["d"] * len(done) + ["p"] * len(park) + ["x"] * len(dead)

        def e(row: Row) -> int:
            return epoch if epoch is not None else self.parts[row.partition].epoch

        return self.conn.execute(
            Q.settle,
            self.params(
                m_parts=[r.partition for r in start], m_epochs=[e(r) for r in start],
                m_ticks=[r.tick for r in start], m_offsets=[r.offset for r in start],
                m_slots=[r.slot for r in start],
                c_ids=[], c_parts=[], c_epochs=[], c_tokens=[], visibility_ms=60_000,
                l_kinds=kinds, l_parts=[r.partition for r in items],
                l_epochs=[e(r) for r in items], l_ticks=[r.tick for r in items],
                l_offsets=[r.offset for r in items], l_slots=[r.slot for r in items],
                l_attempts=[1] * len(items), l_delays=[0] * len(items),
                l_errors=[None if k == "d" else "boom" for k in kinds],
                l_origins=[None if k != "p" else "retry" for k in kinds],
                l_claimed=[False] * len(items),
                k_kinds=[], k_ids=[], k_parts=[], k_epochs=[], k_delays=[], k_errors=[],
            ),
        ).fetchall()  # fmt: skip

    def save(self) -> list[int]:
        """Save each partition's position: here, everything read (tests finish what they
        read before they save)."""
        parts = sorted(self.parts.values(), key=lambda p: p.partition)
        rows = self.conn.execute(
            Q.save_position,
            self.params(
                partitions=[p.partition for p in parts], epochs=[p.epoch for p in parts],
                ticks=[p.done for p in parts],
            ),
        ).fetchall()  # fmt: skip
        return [r["partition"] for r in rows]

    def release(self, partitions: Iterable[int], ticks: Mapping[int, int], *, clean: bool) -> Any:
        parts = [self.parts[p] for p in partitions]
        return self.conn.execute(
            Q.release,
            self.params(
                partitions=[p.partition for p in parts], epochs=[p.epoch for p in parts],
                ticks=[ticks[p.partition] for p in parts], clean=[clean] * len(parts),
                revoked_only=False,
            ),
        ).fetchall()  # fmt: skip


def give(
    conn: psycopg.Connection[Any], group: str, member: str, partitions: list[int]
) -> dict[int, int]:
    """Hand partitions to `member` outright (epoch + 1), with a member row if it has none;
    returns partition -> new epoch."""
    conn.execute(
        "INSERT INTO pgcg.consumer_groups (group_name, member_id, host, pid, session_timeout_ms, "
        "protocol) VALUES (%s, %s, 'test', 1, 60000, 3) ON CONFLICT DO NOTHING",
        (group, member),
    )
    rows = conn.execute(
        "UPDATE pgcg.partition_assignments SET member_id = %s, state = 'assigned', "
        "epoch = epoch + 1, target_member_id = NULL, revoke_deadline = NULL "
        "WHERE group_name = %s AND partition = ANY(%s) RETURNING partition, epoch",
        (member, group, partitions),
    ).fetchall()
    return {r["partition"]: r["epoch"] for r in rows}


def enqueue(
    conn: psycopg.Connection[Any], topic: str, keys: list[str], payloads: list[Any] | None = None
) -> list[int]:
    payloads = payloads if payloads is not None else [{"n": i} for i in range(len(keys))]
    rows = conn.execute(
        "SELECT id FROM pgcg.enqueue(%s, %s, %s::jsonb[])",
        (topic, keys, [json.dumps(p) for p in payloads]),
    ).fetchall()
    return [r["id"] if isinstance(r, dict) else r[0] for r in rows]


def tick_now(conn: psycopg.Connection[Any], topic: str) -> int:
    """A tick now, whatever the interval (the next fetch reads up to it)."""
    row = conn.execute(
        "SELECT pgcg.tick_now(id) AS t FROM pgcg.topics WHERE name = %s", (topic,)
    ).fetchone()
    assert row is not None
    return int(row["t"] if isinstance(row, dict) else row[0])


def nested_plans(
    conn: psycopg.Connection[Any], query: str, params: Mapping[str, Any] | None = None
) -> list[Plan]:
    """The executed plans of every statement `query` ran inside functions (auto_explain), in
    a transaction rolled back afterwards (its writes go with it)."""
    notices: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        if diag.message_primary and diag.message_primary.startswith("duration:"):
            notices.append(diag.message_primary)

    conn.add_notice_handler(collect)
    try:
        with conn.transaction(force_rollback=True), conn.cursor(row_factory=dict_row) as cur:
            cur.execute("LOAD 'auto_explain'")
            for name, value in (
                ("auto_explain.log_min_duration", "0"),
                ("auto_explain.log_analyze", "on"),
                ("auto_explain.log_buffers", "on"),
                ("auto_explain.log_timing", "off"),
                ("auto_explain.log_nested_statements", "on"),
                ("auto_explain.log_format", "json"),
                ("client_min_messages", "log"),
            ):
                cur.execute("SELECT set_config(%s, %s, true)", (name, value))
            cur.execute(query, params)
    finally:
        conn.remove_notice_handler(collect)
    plans = []
    for text in notices:
        doc = json.loads(text.split("plan:", 1)[1])
        plans.append(dict(doc["Plan"], **{"Query Text": doc.get("Query Text", "")}))
    return plans


def logged(conn: psycopg.Connection[Any], topic: str) -> list[dict[str, Any]]:
    """What a topic's log holds, as producers wrote it, in position order within each
    partition: id (offset * 1024 + partition), partition, offset, key, payload, headers,
    dedup_key, enqueued_at, available_at, and the slot table it went into (`child`)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            'SELECT l."offset" * 1024 + l.partition AS id, l.partition, l."offset", l.key, '
            "l.payload, l.headers, l.dedup_key, l.enqueued_at, l.available_at, "
            "l.tableoid::regclass::text AS child "
            "FROM pgcg.log AS l JOIN pgcg.topics AS t "
            "ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63 "
            'WHERE t.name = %s ORDER BY l.partition, l."offset"',
            (topic,),
        ).fetchall()


def settle_round(
    owner: Owner,
    *,
    marks: Iterable[tuple[Row, int]] = (),
    claims: Iterable[tuple[int, int, int] | tuple[int, int, int, str]] = (),
    logs: Iterable[tuple[str, Row, int, int, str | None]] = (),
    parked: Iterable[tuple[str, int, int, int]] = (),
) -> list[dict[str, Any]]:
    """One round of writes, as the consumer's writer sends it: marks (row, epoch); claims
    (parked id, partition, epoch, and the claim's token, a fresh one if left out); log
    results (kind d/p/x, row, epoch, attempts, origin); parked results (kind d/r/x, parked
    id, partition, epoch)."""
    marks, claims, logs, parked = list(marks), list(claims), list(logs), list(parked)
    return owner.conn.execute(
        Q.settle,
        owner.params(
            m_parts=[r.partition for r, _ in marks], m_epochs=[e for _, e in marks],
            m_ticks=[r.tick for r, _ in marks], m_offsets=[r.offset for r, _ in marks],
            m_slots=[r.slot for r, _ in marks],
            c_ids=[c[0] for c in claims], c_parts=[c[1] for c in claims],
            c_epochs=[c[2] for c in claims],
            c_tokens=[c[3] if len(c) > 3 else uuid.uuid4().hex for c in claims],
            visibility_ms=60_000,
            l_kinds=[x[0] for x in logs], l_parts=[x[1].partition for x in logs],
            l_epochs=[x[2] for x in logs], l_ticks=[x[1].tick for x in logs],
            l_offsets=[x[1].offset for x in logs], l_slots=[x[1].slot for x in logs],
            l_attempts=[x[3] for x in logs], l_delays=[0] * len(logs),
            l_errors=[None if x[0] == "d" else "boom" for x in logs],
            l_origins=[x[4] for x in logs], l_claimed=[False] * len(logs),
            k_kinds=[k[0] for k in parked], k_ids=[k[1] for k in parked],
            k_parts=[k[2] for k in parked], k_epochs=[k[3] for k in parked],
            k_delays=[0] * len(parked),
            k_errors=[None if k[0] == "d" else "boom" for k in parked],
        ),
    ).fetchall()  # fmt: skip
