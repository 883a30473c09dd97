"""The per-key scheduler against a model, through random operations (hypothesis stateful).

The model is the rule set in consumer/scheduler.py stated as plainly as possible: a key's
buffered messages form an id-ordered queue; only its lowest id may be handed out, only
when due, and only while nothing of the key is out. Everything the scheduler hands out or
reports is checked against it after every step.
"""

from __future__ import annotations

import datetime

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from pgcg.consumer.message import Claimed, Message
from pgcg.consumer.scheduler import KeyScheduler

KEYS = ["a", "b", "c", "d", "e"]
PARTITION_OF = {k: i % 3 for i, k in enumerate(KEYS)}  # a key always lives in one partition
EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def claimed(id_: int, key: str, due: float) -> Claimed:
    msg = Message(id_, "t", PARTITION_OF[key], key, {"id": id_}, {}, 1, EPOCH)
    return Claimed(msg, epoch=1, due=due)


class SchedulerModel(RuleBasedStateMachine):
    out = Bundle("out")  # items handed out by take() and not yet finished or deferred

    def __init__(self) -> None:
        super().__init__()
        self.s = KeyScheduler()
        self.now = 100.0
        self.next_id = 1000  # ids of new claims grow from here
        self.low_id = 1000  # ids of late arrivals shrink from here
        self.buffered: dict[int, Claimed] = {}  # id -> item the scheduler should hold
        self.busy: dict[str, Claimed] = {}  # key -> its item that is out
        self.kept_busy: set[int] = set()  # out items of dropped-with-keep_busy partitions

    # -- helpers ---------------------------------------------------------------------------

    def of_key(self, key: str) -> list[Claimed]:
        return sorted((c for c in self.buffered.values() if c.key == key), key=lambda c: c.id)

    def head(self, key: str) -> Claimed | None:
        items = self.of_key(key)
        return items[0] if items else None

    # -- operations ------------------------------------------------------------------------

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from(KEYS), st.sampled_from([-5.0, 0.0, 0.5, 3.0, 10.0])),
            min_size=1,
            max_size=6,
        ),
        late=st.booleans(),
    )
    def add(self, batch: list[tuple[str, float]], late: bool) -> None:
        """New claims; `late` gives them ids lower than everything seen (a late commit or a
        replayed dead letter), which must still go in id order."""
        items = []
        for key, offset in batch:
            if late:
                self.low_id -= 1
                id_ = self.low_id
            else:
                self.next_id += 1
                id_ = self.next_id
            items.append(claimed(id_, key, self.now + offset))
        # An id that is still held is ignored (the claim query can return a row twice only
        # across epochs, after a drop; model both by offering one known id again).
        if self.buffered:
            known = next(iter(self.buffered.values()))
            items.append(claimed(known.id, known.key, self.now))
        added = self.s.add(items, self.now)
        new = [c for c in items if c.id not in self.buffered]
        assert added == len({c.id for c in new})
        for c in new:
            self.buffered.setdefault(c.id, c)

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 4.0, 20.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(target=out, limit=st.integers(min_value=1, max_value=4))
    def take(self, limit: int) -> object:
        taken = self.s.take(self.now, limit)
        self.check_taken(taken, limit)
        return multiple(*taken)

    @rule(target=out)
    def take_all(self) -> object:
        taken = self.s.take(self.now, 10_000)
        self.check_taken(taken, 10_000)
        # Liveness: nothing that could go was left behind.
        for key in KEYS:
            head = self.head(key)
            if head is not None and key not in self.busy:
                assert head.due > self.now, f"key {key}: due head {head.id} not handed out"
        return multiple(*taken)

    def check_taken(self, taken: list[Claimed], limit: int) -> None:
        assert len(taken) <= limit
        keys = [c.key for c in taken]
        assert len(keys) == len(set(keys)), "two heads of one key handed out at once"
        for c in taken:
            assert c.key not in self.busy, f"key {c.key} handed out while {self.busy} is out"
            assert c.id in self.buffered, f"{c.id} was never buffered, or was dropped/finished"
            head = self.head(c.key)
            assert head is c, f"key {c.key}: took {c.id} but its head is {head and head.id}"
            assert c.due <= self.now, f"{c.id} taken before it was due"
            self.busy[c.key] = c

    @rule(item=consumes(out))
    def finish(self, item: Claimed) -> None:
        self.s.finish(item, self.now)
        if self.busy.get(item.key) is item:
            del self.busy[item.key]
            del self.buffered[item.id]
            self.kept_busy.discard(item.id)

    @rule(item=consumes(out), delay=st.sampled_from([0.0, 0.5, 2.0, 30.0]))
    def defer(self, item: Claimed, delay: float) -> None:
        self.s.defer(item, self.now + delay, self.now)
        if self.busy.get(item.key) is item:
            del self.busy[item.key]
            self.kept_busy.discard(item.id)
            assert item.due == self.now + delay

    @rule(partition=st.sampled_from([0, 1, 2]), keep_busy=st.booleans())
    def drop_partition(self, partition: int, keep_busy: bool) -> None:
        expected = {
            c.id
            for c in self.buffered.values()
            if c.partition == partition and not (keep_busy and self.busy.get(c.key) is c)
        }
        dropped = self.s.drop_partition(partition, keep_busy=keep_busy)
        assert {c.id for c in dropped} == expected
        assert len(dropped) == len(expected)
        for id_ in expected:
            del self.buffered[id_]
        for key, c in list(self.busy.items()):
            if c.partition != partition:
                continue
            if keep_busy:
                self.kept_busy.add(c.id)
            else:
                del self.busy[key]  # its result will arrive and must change nothing

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def counts_match(self) -> None:
        assert self.s.buffered() == len(self.buffered)
        assert self.s.busy() == len(self.busy)
        for p in (0, 1, 2):
            assert self.s.buffered(p) == sum(1 for c in self.buffered.values() if c.partition == p)
            assert self.s.busy(p) == sum(1 for c in self.busy.values() if c.partition == p)

    @invariant()
    def next_due_is_never_late(self) -> None:
        """The dispatcher sleeps until next_due(): a blocked head must not be overslept."""
        blocked = [
            h.due
            for k in KEYS
            if k not in self.busy and (h := self.head(k)) is not None and h.due > self.now
        ]
        nd = self.s.next_due()
        if blocked:
            assert nd is not None and nd <= min(blocked)

    @invariant()
    def ready_means_a_due_idle_head(self) -> None:
        if self.s.has_ready():
            assert any(
                k not in self.busy and (h := self.head(k)) is not None and h.due <= self.now
                for k in KEYS
            )


SchedulerModel.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestScheduler = SchedulerModel.TestCase


# -- the traps, spelled out -------------------------------------------------------------------


def test_head_waiting_for_retry_blocks_later_messages_of_its_key() -> None:
    s = KeyScheduler()
    a1, a2, b1 = claimed(1, "a", 0.0), claimed(2, "a", 0.0), claimed(3, "b", 0.0)
    s.add([a1, a2, b1], now=0.0)
    assert s.take(0.0, 10) == [a1, b1]
    s.defer(a1, due=5.0, now=1.0)
    s.finish(b1, 1.0)
    assert s.take(1.0, 10) == []  # a2 is due but must wait for a1
    assert s.next_due() == 5.0
    assert s.take(5.0, 10) == [a1]
    s.finish(a1, 5.0)
    assert s.take(5.0, 10) == [a2]


def test_claimed_head_not_yet_due_blocks_its_key_after_a_hand_off() -> None:
    """A new owner sees only rows: the old owner's retry arrives as a head that is not due."""
    s = KeyScheduler()
    s.add([claimed(1, "a", 5.0), claimed(2, "a", 0.0), claimed(3, "b", 0.0)], now=0.0)
    assert [c.id for c in s.take(0.0, 10)] == [3]
    assert s.take(4.9, 10) == []
    assert [c.id for c in s.take(5.0, 10)] == [1]


def test_late_lower_id_that_is_not_due_blocks_a_due_head() -> None:
    s = KeyScheduler()
    s.add([claimed(10, "a", 0.0)], now=0.0)
    s.add([claimed(5, "a", 3.0)], now=0.0)  # a replayed message, waiting for its retry
    assert s.take(0.0, 10) == []
    assert [c.id for c in s.take(3.0, 10)] == [5]


def test_late_lower_id_goes_after_the_head_being_handled() -> None:
    s = KeyScheduler()
    s.add([claimed(10, "a", 0.0), claimed(11, "a", 0.0)], now=0.0)
    (head,) = s.take(0.0, 10)
    s.add([claimed(5, "a", 0.0)], now=0.0)
    assert s.take(0.0, 10) == []
    s.finish(head, 0.0)
    assert [c.id for c in s.take(0.0, 10)] == [5]
