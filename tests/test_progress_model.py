"""A model of one group's per-partition progress against the real storage, at the SQL level.

Hypothesis drives producers (some transactions held open and committed or rolled back
later), ticks, owners that read, mark, finish, fail (park or dead-letter), save and
release, hand-offs to a new owner with or without a clean release, crashed owners, and
stale owners that keep writing after they lost a partition. The model plays the consumer's
part faithfully (one message of a key at a time, a failed message parks its key from there
on, a position is saved only past finished messages) and checks what a user is promised:

- a message is handed out only once it is committed, in the batch of the first tick after
  its commit, and never again once finished (unless its completion never committed);
- per key, a message starts only when every message of the key before it in position
  order, (tick, offset), is finished, parked messages included;
- a stale owner's writes change nothing;
- the parked queue, the dead letters and the positions in the database are the model's;
- at the end a fresh owner drains everything: every committed message was finished
  exactly once, none was skipped.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row

from tests.logclient import Owner, Q, Row, enqueue, give, settle_round, tick_now

TOPIC = "model"
PARTITIONS = 2
KEYS = ["a", "b", "c", "d", "e"]
NAMES = ["m0", "m1", "m2"]
MAX_ATTEMPTS = 3
PRODUCERS = 2

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Msg:
    id: int
    key: str
    partition: int
    offset: int
    producer: int | None  # the open transaction it belongs to, None once it ended
    committed: bool = False
    rolled_back: bool = False
    batch: int | None = None  # the first tick taken after its commit
    state: str = "log"  # log | parked | done | dead
    finishes: int = 0
    parked_id: int | None = None
    attempts: int = 0  # of the parked copy
    claimed: bool = False

    @property
    def position(self) -> tuple[int, int]:
        assert self.batch is not None
        return (self.batch, self.offset)


@dataclass
class Started:
    """A delivery in flight: a log row after its mark, or a parked message after its claim."""

    msg: Msg
    partition: int
    epoch: int
    row: Row | None = None  # log deliveries
    parked_id: int | None = None  # parked deliveries


@dataclass
class Incarnation:
    """One run of a member: its reader state and deliveries in flight. A crash drops it."""

    name: str
    owner: Owner
    alive: bool = True
    held: dict[int, list[Row]] = field(default_factory=dict)
    started: dict[int, Started] = field(default_factory=dict)  # by message id
    stale_epochs: dict[int, int] = field(default_factory=dict)  # partition -> lost epoch
    zombie: list[Started] = field(default_factory=list)  # cut off, charged to a later owner

    def live_partitions(self) -> list[int]:
        return sorted(self.owner.parts) if self.alive else []


def step(fn: F) -> F:
    """Marks a rule as having run to its end: the drain at teardown runs only then, so a
    failed check is reported as itself and not as whatever the drain trips on next."""

    @functools.wraps(fn)
    def wrapper(self: ProgressModel, *args: Any, **kwargs: Any) -> Any:
        self.healthy = False
        result = fn(self, *args, **kwargs)
        self.healthy = True
        return result

    return wrapper  # type: ignore[return-value]


class ProgressModel(RuleBasedStateMachine):
    db: psycopg.Connection[dict[str, Any]]
    producers: list[psycopg.Connection[dict[str, Any]]]
    serial = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        # One topic for the test, a new group per example, starting at the newest tick:
        # it sees nothing of the examples before (their producers all ended).
        self.topic, self.group = TOPIC, f"model_{next(self.serial)}"
        self.db.execute("SELECT pgcg.create_group(%s, %s, 'latest')", (self.group, self.topic))
        (row,) = self.db.execute(
            "SELECT t.id, g.id AS group_id FROM pgcg.topics AS t, pgcg.groups AS g "
            "WHERE t.name = %s AND g.group_name = %s",
            (self.topic, self.group),
        ).fetchall()
        self.topic_id, self.group_id = row["id"], row["group_id"]
        self.last_tick = self.newest_tick()
        self.msgs: dict[int, Msg] = {}
        self.open: dict[int, list[Msg]] = {}  # producer -> messages of its open transaction
        self.incs: list[Incarnation] = []
        self.assigned: dict[int, tuple[Incarnation, int]] = {}
        self.position: dict[int, int] = self.progress_ticks()
        self.key_partition: dict[str, int] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def newest_tick(self) -> int:
        row = self.db.execute(
            "SELECT max(tick) AS t FROM pgcg.ticks WHERE topic_id = %s", (self.topic_id,)
        ).fetchone()
        assert row is not None
        return int(row["t"])

    def progress_ticks(self) -> dict[int, int]:
        rows = self.db.execute(
            "SELECT partition, tick FROM pgcg.group_progress WHERE group_id = %s",
            (self.group_id,),
        ).fetchall()
        return {r["partition"]: r["tick"] for r in rows}

    def ticked(self, tick: int) -> None:
        """A tick was taken after every commit so far: their batch is that tick."""
        if tick == self.last_tick:
            return
        assert tick > self.last_tick
        self.last_tick = tick
        for m in self.msgs.values():
            if m.committed and m.batch is None:
                m.batch = tick

    def in_flight(self) -> bool:
        """Something a hand-off must carry over: read, running, or parked."""
        return any(i.started or any(i.held.values()) for i in self.live()) or any(
            m.state == "parked" for m in self.msgs.values()
        )

    def may_save(self) -> bool:
        return any(
            self.safe_tick(i, p) > self.position[p]
            for i in self.live()
            for p in i.live_partitions()
        )

    def unread(self) -> bool:
        """Some committed message a read could return (none is held or running)."""
        taken = {r.id for i in self.incs for rows in i.held.values() for r in rows}
        taken |= {id_ for i in self.incs for id_ in i.started}
        return any(m.state == "log" and m.batch is not None and m.id not in taken
                   for m in self.msgs.values())  # fmt: skip

    def live(self) -> list[Incarnation]:
        return [i for i in self.incs if i.alive and i.owner.parts]

    def incarnation(self, name: str) -> Incarnation:
        for inc in self.incs:
            if inc.alive and inc.name == name:
                return inc
        inc = Incarnation(name, Owner(self.db, self.group, name))
        self.incs.append(inc)
        return inc

    def key_msgs(self, key: str) -> list[Msg]:
        return [m for m in self.msgs.values() if m.key == key and not m.rolled_back]

    def has_parked(self, key: str) -> bool:
        return any(m.state == "parked" for m in self.key_msgs(key))

    def busy_keys(self, inc: Incarnation) -> set[str]:
        return {s.msg.key for s in inc.started.values()}

    def check_may_start(self, m: Msg) -> None:
        """The storage handed out `m` as the next of its key: everything before it is done."""
        assert m.state in ("log", "parked"), f"message {m.id} started again after {m.state}"
        assert m.committed and m.batch is not None, f"message {m.id} handed out uncommitted"
        for x in self.key_msgs(m.key):
            if x is not m and x.batch is not None and x.position < m.position:
                assert x.state in ("done", "dead"), (
                    f"key {m.key!r}: message {m.id} at {m.position} started while {x.id} at "
                    f"{x.position} before it is {x.state}"
                )

    def safe_tick(self, inc: Incarnation, partition: int) -> int:
        """The position the consumer may save: every batch up to it read and finished."""
        part = inc.owner.parts[partition]
        pending = [r.a_tick for r in inc.held.get(partition, [])]
        pending += [s.row.a_tick for s in inc.started.values()
                    if s.row is not None and s.partition == partition]  # fmt: skip
        return min([part.done, *pending])

    def finish(self, m: Msg, state: str) -> None:
        m.finishes += 1
        assert m.finishes == 1, f"message {m.id} finished {m.finishes} times"
        m.state, m.claimed, m.parked_id = state, False, None

    def learn_parked_ids(self) -> None:
        rows = self.db.execute(
            'SELECT id, partition, "offset" FROM pgcg.parked WHERE group_id = %s',
            (self.group_id,),
        ).fetchall()
        by_place = {(r["partition"], r["offset"]): r["id"] for r in rows}
        for m in self.msgs.values():
            if m.state == "parked":
                m.parked_id = by_place.get((m.partition, m.offset))

    def take(self, inc: Incarnation, partition: int, epoch: int) -> None:
        """`inc` starts `partition` at `epoch`: the deliveries cut off before are charged."""
        charged = buried = 0
        for other in self.incs:
            for s in [s for s in other.started.values() if s.partition == partition]:
                del other.started[s.msg.id]
                other.zombie.append(s)
                if s.row is not None:
                    s.msg.state, s.msg.attempts = "parked", 1
                    charged += 1
                elif s.msg.attempts >= MAX_ATTEMPTS:
                    self.finish(s.msg, "dead")
                    buried += 1
                else:
                    s.msg.claimed = False
        got = inc.owner.adopt(partition, epoch, max_attempts=MAX_ATTEMPTS)
        assert got is not None, f"{inc.name} could not adopt partition {partition} at {epoch}"
        assert (got["charged"], got["buried"]) == (charged, buried), (got, charged, buried)
        if charged or buried:
            event("adopt charged cut-off deliveries")
        self.learn_parked_ids()
        inc.stale_epochs.pop(partition, None)
        inc.held[partition] = []
        self.assigned[partition] = (inc, epoch)

    def lose(self, inc: Incarnation, partition: int) -> None:
        """`inc` no longer owns `partition`: what it read there is forgotten, what it started
        runs on (a stale owner), its epoch is kept for writes that must be fenced."""
        part = inc.owner.parts.pop(partition)
        inc.stale_epochs[partition] = part.epoch
        inc.held.pop(partition, None)

    # -- setup ------------------------------------------------------------------------------

    @initialize()
    def first_owner(self) -> None:
        inc = self.incarnation(NAMES[0])
        for partition, epoch in give(
            self.db, self.group, inc.name, list(range(PARTITIONS))
        ).items():
            self.take(inc, partition, epoch)

    # -- producers --------------------------------------------------------------------------

    @precondition(lambda self: len(self.msgs) < 30)
    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4),
          producer=st.sampled_from([None, *range(PRODUCERS)]), then_tick=st.booleans())  # fmt: skip
    @step
    def produce(self, keys: list[str], producer: int | None, then_tick: bool) -> None:
        """Enqueue, committed at once (None) or inside a producer's open transaction."""
        conn = self.db if producer is None else self.producers[producer]
        ids = enqueue(conn, self.topic, keys)
        for key, id_ in zip(keys, ids, strict=True):
            m = Msg(id_, key, id_ % 1024, id_ // 1024, producer)
            assert self.key_partition.setdefault(key, m.partition) == m.partition
            self.msgs[id_] = m
            if producer is None:
                m.committed = True
            else:
                self.open.setdefault(producer, []).append(m)
        if then_tick:
            self.ticked(tick_now(self.db, self.topic))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), commit=st.booleans())
    @step
    def end_transaction(self, data: st.DataObject, commit: bool) -> None:
        producer = data.draw(st.sampled_from(sorted(self.open)))
        conn = self.producers[producer]
        if commit:
            conn.commit()
        else:
            conn.rollback()
        for m in self.open.pop(producer):
            m.producer = None
            m.committed, m.rolled_back = commit, not commit
            if commit and any(
                x.committed
                and x.offset > m.offset
                and x.partition == m.partition
                and x.producer is None
                for x in self.msgs.values()
                if x is not m
            ):
                event("a producer committed after a later offset")

    @precondition(lambda self: any(m.committed and m.batch is None for m in self.msgs.values()))
    @rule()
    @step
    def tick(self) -> None:
        self.ticked(tick_now(self.db, self.topic))

    # -- an owner's work --------------------------------------------------------------------

    def read(self, inc: Incarnation, limit: int) -> int:
        rows = inc.owner.fetch(limit=limit)
        self.ticked(self.newest_tick())
        follow: list[Row] = []
        for row in rows:
            m = self.msgs.get(row.id)
            assert m is not None, f"read {row.id}, never enqueued"
            assert m.committed, f"read {row.id}: {'rolled back' if m.rolled_back else 'open'}"
            assert row.tick == m.batch, f"{row.id}: read in batch {row.tick}, not {m.batch}"
            assert m.state == "log", f"{row.id} read again, though {m.state}"
            assert all(m.id not in i.started for i in self.incs), f"{row.id} read while running"
            assert all(r.id != row.id for r in inc.held[row.partition]), f"{row.id} read twice"
            parked = self.has_parked(m.key)
            assert (row.state == "p") == parked, (
                f"{row.id} read as {row.state!r}; its key {'has' if parked else 'has no'} "
                "parked messages"
            )
            if row.state == "p":
                follow.append(row)
                m.state = "parked"
            else:
                inc.held[row.partition].append(row)
        if follow:
            event("read rows behind a parked key")
            self.park(inc, [], follow)
        if any(
            m.batch is not None and m.batch < self.last_tick and r.tick == m.batch
            for r in rows
            for m in [self.msgs[r.id]]
        ):
            event("read a batch older than the newest tick")
        return len(rows)

    def park(self, inc: Incarnation, failed: list[Started], follow: list[Row]) -> None:
        """Failed log deliveries and the rows that follow them in their key, parked in that
        order in one round (the parked ids keep the key's order)."""
        logs: list[tuple[str, Row, int, int, str | None]] = []
        for s in failed:
            assert s.row is not None
            logs.append(("p", s.row, s.epoch, 1, "retry"))
            behind = [r for r in inc.held[s.partition] if r.key == s.msg.key]
            inc.held[s.partition] = [r for r in inc.held[s.partition] if r.key != s.msg.key]
            logs += [("p", r, s.epoch, 0, "follow") for r in behind]
            for r in behind:
                self.msgs[r.id].state = "parked"
        logs += [("p", r, inc.owner.parts[r.partition].epoch, 0, "follow") for r in follow]
        answer = settle_round(inc.owner, logs=logs)
        for a in answer:
            assert a["ok"], f"{inc.name}: park of {a['ref']} in {a['partition']} refused"
        for _kind, r, _, attempts, _ in logs:
            m = self.msgs[r.id]
            m.state, m.attempts, m.claimed = "parked", attempts, False
        self.learn_parked_ids()

    @precondition(lambda self: self.unread())
    @rule(data=st.data(), limit=st.sampled_from([2, 100]), then_start=st.booleans())
    @step
    def fetch(self, data: st.DataObject, limit: int, then_start: bool) -> None:
        inc = data.draw(st.sampled_from(self.live()))
        self.read(inc, limit)
        if then_start:
            self.start_some(inc, data)

    @precondition(lambda self: any(any(i.held.values()) for i in self.live()))
    @rule(data=st.data())
    @step
    def start(self, data: st.DataObject) -> None:
        """Mark the next message of some keys (one at a time per key), as a dispatch does."""
        inc = data.draw(st.sampled_from([i for i in self.live() if any(i.held.values())]))
        self.start_some(inc, data)

    def start_some(self, inc: Incarnation, data: st.DataObject) -> None:
        heads: list[Row] = []
        busy = self.busy_keys(inc)
        for partition in inc.live_partitions():
            for row in inc.held[partition]:
                if row.key not in busy:
                    busy.add(row.key)
                    heads.append(row)
        if not heads:
            return
        chosen = data.draw(st.lists(st.sampled_from(heads), min_size=1, unique_by=lambda r: r.id))
        for row in chosen:
            assert not self.has_parked(row.key), f"{row.id} held while its key is parked"
            self.check_may_start(self.msgs[row.id])
        marks = [(r, inc.owner.parts[r.partition].epoch) for r in chosen]
        answer = settle_round(inc.owner, marks=marks)
        assert all(a["ok"] for a in answer), answer
        for row, epoch in marks:
            inc.held[row.partition].remove(row)
            inc.started[row.id] = Started(self.msgs[row.id], row.partition, epoch, row=row)

    @precondition(lambda self: any(m.state == "parked" and not m.claimed
                                   for m in self.msgs.values()) and self.live())  # fmt: skip
    @rule(data=st.data())
    @step
    def claim_parked(self, data: st.DataObject) -> None:
        """Load the due heads of parked keys and claim some (counted before they run)."""
        inc = data.draw(st.sampled_from(self.live()))
        self.claim(inc, data.draw)

    def claim(self, inc: Incarnation, draw: Callable[[Any], Any] | None) -> int:
        parts = inc.live_partitions()
        held = [s.parked_id for s in inc.started.values() if s.parked_id is not None]
        rows = self.db.execute(
            Q.load_parked,
            {"group": self.group, "partitions": parts, "held": held, "lookahead_ms": 60_000,
             "limit": 1000, "followers": 0},
        ).fetchall()  # fmt: skip
        expected = set()
        for key in KEYS:
            waiting = sorted((m for m in self.key_msgs(key) if m.state == "parked"),
                             key=lambda m: m.position)  # fmt: skip
            if waiting and waiting[0].partition in parts and not waiting[0].claimed:
                expected.add(waiting[0].id)
        got = {r["offset"] * 1024 + r["partition"] for r in rows}
        assert got == expected, f"parked heads {sorted(got)}, expected {sorted(expected)}"
        for r in rows:
            m = self.msgs[r["offset"] * 1024 + r["partition"]]
            assert r["id"] == m.parked_id, (dict(r), m)
            # A copy parked by adopt (a delivery cut off) records the tick of its mark, the
            # newest message of that round (the ledger keeps no tick per message); nothing
            # reads it back. Any other copy records the message's own.
            if r["origin"] == "interrupted":
                assert m.batch is not None and r["tick"] >= m.batch, (dict(r), m)
            else:
                assert r["tick"] == m.batch, (dict(r), m)
            assert r["attempts"] == m.attempts, (dict(r), m)
        busy = self.busy_keys(inc)
        heads = [r for r in rows if r["key"] not in busy]
        if not heads:
            return 0
        chosen = heads if draw is None else draw(st.lists(st.sampled_from(heads), min_size=1,
                                                          unique_by=lambda r: r["id"]))  # fmt: skip
        for r in chosen:
            self.check_may_start(self.msgs[r["offset"] * 1024 + r["partition"]])
        claims = [(r["id"], r["partition"], inc.owner.parts[r["partition"]].epoch) for r in chosen]
        answer = settle_round(inc.owner, claims=claims)
        by_id = {a["ref"]: a for a in answer}
        for r, (pid, partition, epoch) in zip(chosen, claims, strict=True):
            m = self.msgs[r["offset"] * 1024 + r["partition"]]
            assert by_id[pid]["ok"], f"claim of parked {pid} refused"
            assert by_id[pid]["info"] == m.attempts + 1, (by_id[pid], m)
            m.attempts += 1
            m.claimed = True
            event(f"claimed a parked message (attempt {m.attempts})")
            inc.started[m.id] = Started(m, partition, epoch, parked_id=pid)
        return len(chosen)

    @precondition(lambda self: any(i.started for i in self.live()))
    @rule(data=st.data())
    @step
    def complete(self, data: st.DataObject) -> None:
        """Finish any subset of the deliveries in flight, in any order: handled, failed
        (parked, or retried when already parked) or dead-lettered."""
        inc = data.draw(st.sampled_from([i for i in self.live() if i.started]))
        chosen = data.draw(st.lists(st.sampled_from(sorted(inc.started)), min_size=1,
                                    unique=True))  # fmt: skip
        outcomes = [data.draw(st.sampled_from(["done", "done", "fail", "dead"])) for _ in chosen]
        self.results(inc, [inc.started[i] for i in chosen], outcomes)

    def results(self, inc: Incarnation, items: list[Started], outcomes: list[str]) -> None:
        logs: list[tuple[str, Row, int, int, str | None]] = []
        parked: list[tuple[str, int, int, int]] = []
        failed: list[Started] = []
        for s, outcome in zip(items, outcomes, strict=True):
            if s.row is not None:
                if outcome == "fail":
                    failed.append(s)
                else:
                    logs.append(("d" if outcome == "done" else "x", s.row, s.epoch, 1, None))
            else:
                assert s.parked_id is not None
                if outcome == "fail" and s.msg.attempts >= MAX_ATTEMPTS:
                    outcome = "dead"
                kind = {"done": "d", "fail": "r", "dead": "x"}[outcome]
                parked.append((kind, s.parked_id, s.partition, s.epoch))
        if logs or parked:
            answer = settle_round(inc.owner, logs=logs, parked=parked)
            assert all(a["ok"] for a in answer), answer
        for s, outcome in zip(items, outcomes, strict=True):
            del inc.started[s.msg.id]
            if s.row is None and outcome == "fail" and s.msg.attempts < MAX_ATTEMPTS:
                s.msg.claimed = False
            elif outcome == "done":
                self.finish(s.msg, "done")
            elif outcome != "fail" or s.row is None:
                self.finish(s.msg, "dead")
        if failed:
            self.park(inc, failed, [])

    @precondition(lambda self: self.may_save())
    @rule(data=st.data())
    @step
    def save(self, data: st.DataObject) -> None:
        inc = data.draw(st.sampled_from(self.live()))
        parts = inc.live_partitions()
        if not parts:
            return
        ticks = {p: self.safe_tick(inc, p) for p in parts}
        saved = self.db.execute(
            Q.save_position,
            inc.owner.params(partitions=parts, epochs=[inc.owner.parts[p].epoch for p in parts],
                             ticks=[ticks[p] for p in parts]),
        ).fetchall()  # fmt: skip
        assert sorted(r["partition"] for r in saved) == parts
        for p in parts:
            self.position[p] = max(self.position[p], ticks[p])

    # -- hand-offs --------------------------------------------------------------------------

    @precondition(lambda self: self.in_flight())
    @rule(partition=st.integers(0, PARTITIONS - 1), to=st.sampled_from(NAMES),
          how=st.sampled_from(["release", "unclean release", "taken"]))  # fmt: skip
    @step
    def hand_off(self, partition: int, to: str, how: str) -> None:
        """Give a partition to another member at epoch + 1: after a release (clean when
        nothing of the partition is running), or taken outright from a member that goes on
        running (its writes must then be fenced)."""
        old, _ = self.assigned[partition]
        if to == old.name:
            return
        if how != "taken":
            tick = self.safe_tick(old, partition)
            running = any(s.partition == partition for s in old.started.values())
            released = old.owner.release(
                [partition], {partition: tick}, clean=how == "release" and not running
            )
            assert [r["partition"] for r in released] == [partition]
            self.position[partition] = max(self.position[partition], tick)
            event("released " + ("clean" if how == "release" and not running else "unclean"))
        self.lose(old, partition)
        new = self.incarnation(to)
        (epoch,) = give(self.db, self.group, new.name, [partition]).values()
        self.take(new, partition, epoch)

    @precondition(lambda self: self.in_flight())
    @rule(data=st.data(), to=st.sampled_from(NAMES))
    @step
    def crash(self, data: st.DataObject, to: str) -> None:
        """An owner dies without saving or releasing; its partitions go to `to` (the same
        member restarted, or another)."""
        dead = data.draw(st.sampled_from(self.live()))
        parts = dead.live_partitions()
        for partition in parts:
            self.lose(dead, partition)  # it may still be running: its writes must be fenced
        dead.alive = False
        new = self.incarnation(to)
        for partition, epoch in give(self.db, self.group, new.name, parts).items():
            self.take(new, partition, epoch)

    def footprint(self) -> tuple[Any, ...]:
        g = (self.group_id,)
        return (
            self.db.execute("SELECT count(*) AS n FROM pgcg.ledger WHERE group_id = %s",
                            g).fetchone(),
            self.db.execute('SELECT id, "offset", attempts, claimed_epoch, available_at '
                            "FROM pgcg.parked WHERE group_id = %s ORDER BY id", g).fetchall(),
            self.db.execute("SELECT count(*) AS n FROM pgcg.dead_letters WHERE group_name = %s",
                            (self.group,)).fetchone(),
            self.db.execute("SELECT partition, tick, clean_epoch FROM pgcg.group_progress "
                            "WHERE group_id = %s ORDER BY partition", g).fetchall(),
        )  # fmt: skip

    @precondition(
        lambda self: any(
            inc.stale_epochs.get(s.partition) == s.epoch for inc in self.incs for s in inc.zombie
        )
    )
    @rule(data=st.data(), outcome=st.sampled_from(["done", "fail", "dead"]))
    @step
    def stale_owner_writes(self, data: st.DataObject, outcome: str) -> None:
        """An owner that lost partitions (or died) goes on: marks, results, claims, a saved
        position and a release under its old epochs all write nothing."""
        inc = data.draw(
            st.sampled_from(
                [i for i in self.incs if any(i.stale_epochs.get(s.partition) == s.epoch
                                             for s in i.zombie)]
            )
        )  # fmt: skip
        before = self.footprint()
        stale = [s for s in inc.zombie if inc.stale_epochs.get(s.partition) == s.epoch]
        kind = {"done": "d", "fail": "p", "dead": "x"}[outcome]
        answer = settle_round(
            inc.owner,
            marks=[(r, e) for r, e in ((s.row, s.epoch) for s in stale) if r is not None],
            claims=[(m.parked_id, m.partition, inc.stale_epochs[m.partition])
                    for m in self.msgs.values()
                    if m.state == "parked" and not m.claimed and m.parked_id is not None
                    and m.partition in inc.stale_epochs],
            logs=[(kind, r, s.epoch, 1, "retry" if kind == "p" else None)
                  for s, r in ((s, s.row) for s in stale) if r is not None],
            parked=[("d" if outcome == "done" else "x", s.parked_id, s.partition, s.epoch)
                    for s in stale if s.parked_id is not None],
        )  # fmt: skip
        assert not [a for a in answer if a["ok"]], f"a stale owner's write took effect: {answer}"
        if stale:
            event("a stale owner finished deliveries it lost")
        parts = sorted(inc.stale_epochs)
        epochs = [inc.stale_epochs[p] for p in parts]
        saved = self.db.execute(
            Q.save_position,
            inc.owner.params(partitions=parts, epochs=epochs, ticks=[1 << 60] * len(parts)),
        ).fetchall()
        assert saved == [], saved
        released = self.db.execute(
            Q.release,
            inc.owner.params(partitions=parts, epochs=epochs, ticks=[1 << 60] * len(parts),
                             clean=[True] * len(parts), revoked_only=False),
        ).fetchall()  # fmt: skip
        assert released == [], released
        assert self.footprint() == before, "a stale owner's write changed the group's state"

    # -- what the database must agree with ---------------------------------------------------

    @invariant()
    def database_agrees(self) -> None:
        if not self.healthy:
            return
        self.agrees()

    def agrees(self) -> None:
        parked = self.db.execute(
            'SELECT id, partition, "offset", attempts, claimed_epoch IS NOT NULL AS claimed '
            "FROM pgcg.parked WHERE group_id = %s ORDER BY id",
            (self.group_id,),
        ).fetchall()
        want = {m.id: m for m in self.msgs.values() if m.state == "parked"}
        got = {r["offset"] * 1024 + r["partition"]: r for r in parked}
        assert sorted(got) == sorted(want), f"parked {sorted(got)}, model {sorted(want)}"
        for id_, r in got.items():
            m = want[id_]
            assert (r["id"], r["attempts"], r["claimed"]) == (m.parked_id, m.attempts,
                                                              m.claimed), (dict(r), m)  # fmt: skip
        # A key's parked messages keep the key's order.
        for key in KEYS:
            mine = [got[i] for i in want if self.msgs[i].key == key]
            by_id = [r["offset"] for r in sorted(mine, key=lambda r: r["id"])]
            by_position = [
                r["offset"]
                for r in sorted(
                    mine, key=lambda r: self.msgs[r["offset"] * 1024 + r["partition"]].position
                )
            ]
            assert by_id == by_position, f"key {key!r}: parked in order {by_id}"
        # Each key's first parked row is flagged as its head (load_parked reads only
        # flagged rows); more flags are allowed.
        unflagged = self.db.execute(
            "SELECT id FROM (SELECT DISTINCT ON (partition, key) id, head FROM pgcg.parked "
            "WHERE group_id = %s ORDER BY partition, key, id) AS f WHERE NOT head",
            (self.group_id,),
        ).fetchall()
        assert unflagged == [], f"keys' first parked rows not flagged: {unflagged}"
        dead = self.db.execute(
            'SELECT partition, "offset" FROM pgcg.dead_letters WHERE group_name = %s',
            (self.group,),
        ).fetchall()
        assert sorted(r["offset"] * 1024 + r["partition"] for r in dead) == sorted(
            m.id for m in self.msgs.values() if m.state == "dead"
        )
        assert self.progress_ticks() == self.position

    # -- the end: everything is drained -----------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.healthy:
                self.drain()
        finally:
            for conn in self.producers:
                conn.rollback()

    def drain(self) -> None:
        for producer in sorted(self.open):
            self.producers[producer].commit()
            for m in self.open.pop(producer):
                m.committed, m.producer = True, None
        self.ticked(tick_now(self.db, self.topic))
        # A fresh owner takes every partition from whoever had it (without a release).
        drainer = Incarnation("drainer", Owner(self.db, self.group, "drainer"))
        self.incs.append(drainer)
        for partition in range(PARTITIONS):
            old, _ = self.assigned[partition]
            if old.alive:
                self.lose(old, partition)
        for partition, epoch in give(self.db, self.group, drainer.name,
                                     list(range(PARTITIONS))).items():  # fmt: skip
            self.take(drainer, partition, epoch)
        for _ in range(200):
            moved = self.read(drainer, 100)
            moved += self.claim(drainer, None)
            heads: list[Row] = []
            busy = self.busy_keys(drainer)
            for partition in drainer.live_partitions():
                for row in drainer.held[partition]:
                    if row.key not in busy:
                        busy.add(row.key)
                        heads.append(row)
            for row in heads:
                self.check_may_start(self.msgs[row.id])
            if heads:
                marks = [(r, drainer.owner.parts[r.partition].epoch) for r in heads]
                assert all(a["ok"] for a in settle_round(drainer.owner, marks=marks))
                for row, epoch in marks:
                    drainer.held[row.partition].remove(row)
                    drainer.started[row.id] = Started(self.msgs[row.id], row.partition, epoch,
                                                      row=row)  # fmt: skip
            items = list(drainer.started.values())
            if items:
                self.results(drainer, items, ["done"] * len(items))
            if not moved and not heads and not items:
                break
        else:
            raise AssertionError("the drain never ended")
        self.agrees()
        committed = [m for m in self.msgs.values() if m.committed]
        unfinished = [(m.id, m.key, m.state) for m in committed if m.finishes != 1]
        assert not unfinished, f"never finished (skipped): {unfinished}"
        assert all(m.finishes == 0 for m in self.msgs.values() if m.rolled_back)


def test_per_partition_progress_keeps_every_promise(
    dsn: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, %s)", (TOPIC, PARTITIONS))
    # Ticks only when the model takes them (pgcg.tick_now): examples replay the same way,
    # and batches gather several producers. A tick a fetch takes anyway is seen all the same.
    db.execute("SELECT pgcg.alter_topic(%s, p_tick_interval_ms => 60000)", (TOPIC,))
    producers = [psycopg.connect(dsn, row_factory=dict_row) for _ in range(PRODUCERS)]
    ProgressModel.db, ProgressModel.producers = db, producers
    try:
        run_state_machine_as_test(
            ProgressModel,
            settings=settings(
                max_examples=15,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        for conn in producers:
            conn.close()


pytestmark = pytest.mark.timeout(600)


def test_a_hand_off_does_not_charge_a_message_finished_at_or_below_the_position(
    db: psycopg.Connection[dict[str, Any]],
) -> None:
    """Found by the model: one round marks c (tick 1) and b (tick 2); c is handled, its
    ledger row records tick 1; the owner releases at position 1 (everything up to it is
    finished), b still running. The next owner must charge b alone: c was finished, and
    charging it would park it and hand it out a second time."""
    db.execute("SELECT pgcg.create_topic('handoff', 1)")
    db.execute("SELECT pgcg.create_group('g', 'handoff')")
    first = Owner(db, "g", "first")
    (epoch,) = give(db, "g", first.member, [0]).values()
    first.adopt(0, epoch)
    enqueue(db, "handoff", ["c"])
    tick_now(db, "handoff")
    enqueue(db, "handoff", ["b"])
    tick_now(db, "handoff")
    c, b = first.fetch()
    assert c.tick < b.tick
    first.settle(start=[c, b])
    first.settle(done=[c])
    first.release([0], {0: c.tick}, clean=False)
    second = Owner(db, "g", "second")
    (epoch,) = give(db, "g", second.member, [0]).values()
    adopted = second.adopt(0, epoch)
    assert adopted is not None and adopted["charged"] == 1
    parked = db.execute('SELECT "offset" FROM pgcg.parked').fetchall()
    assert [p["offset"] for p in parked] == [b.offset]
    assert second.fetch() == []
