"""The per-key scheduler against a model, through random operations (hypothesis stateful).

The model is the rule set in consumer/scheduler.py stated as plainly as possible: a key's
held messages form a queue in the key's order (parked ones first, by parked id; then log
ones by position); only its first may be handed out, only when due, and only while
nothing of the key is out; of the crash suspects (parked messages charged for a crash)
only one is out at a time. Everything the scheduler hands out or reports is checked
against it after every step.
"""

from __future__ import annotations

import dataclasses
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

from pgcg.consumer.message import Item, Message
from pgcg.consumer.scheduler import KeyScheduler

KEYS = ["a", "b", "c", "d", "e"]
PARTITION_OF = {k: i % 3 for i, k in enumerate(KEYS)}  # a key always lives in one partition
EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def claimed(id_: int, key: str, due: float, *, parked: bool = False, suspect: bool = False) -> Item:
    """A log message at position (1, id), or (parked) the parked message with that id
    (suspect: charged for a crash)."""
    partition = PARTITION_OF[key]
    msg = Message(id_ * 1024 + partition, "t", partition, key, {"id": id_}, {}, 1, EPOCH,
                  offset=id_)  # fmt: skip
    if parked:
        return Item(msg, epoch=1, due=due, parked_id=id_, suspect=suspect)
    return Item(msg, epoch=1, due=due, tick=1, a_tick=0)


class SchedulerModel(RuleBasedStateMachine):
    out = Bundle("out")  # items handed out by take() and not yet finished or unstarted

    def __init__(self) -> None:
        super().__init__()
        self.s = KeyScheduler()
        self.now = 100.0
        self.next_id = 1000  # ids of new log messages and parked ones grow from here
        self.buffered: dict[int, Item] = {}  # uid -> item the scheduler should hold
        self.busy: dict[str, Item] = {}  # key -> its item that is out
        self.kept_busy: set[int] = set()  # out items of dropped-with-keep_busy partitions

    # -- helpers ---------------------------------------------------------------------------

    def of_key(self, key: str) -> list[Item]:
        """The key's held items in its order; a head that is out stays first."""
        items = sorted((c for c in self.buffered.values() if c.key == key), key=lambda c: c.order)
        busy = self.busy.get(key)
        if busy is not None and busy in items:
            items.remove(busy)
            items.insert(0, busy)
        return items

    def head(self, key: str) -> Item | None:
        items = self.of_key(key)
        return items[0] if items else None

    # -- operations ------------------------------------------------------------------------

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from(KEYS), st.sampled_from([-5.0, 0.0, 0.5, 3.0, 10.0])),
            min_size=1,
            max_size=6,
        ),
        parked=st.booleans(),
        suspect=st.booleans(),
    )
    def add(self, batch: list[tuple[str, float]], parked: bool, suspect: bool) -> None:
        """New messages read from the log, or (parked) loaded from the parked queue: those
        sort before every log message of their key."""
        items = []
        for key, offset in batch:
            self.next_id += 1
            items.append(
                claimed(self.next_id, key, self.now + offset, parked=parked, suspect=suspect)
            )
        # One that is still held is ignored (a re-read after a revocation called off).
        if self.buffered:
            known = next(iter(self.buffered.values()))
            items.append(known)
        added = self.s.add(items, self.now)
        new = [c for c in items if c.uid not in self.buffered]
        assert added == len({c.uid for c in new})
        for c in new:
            self.buffered.setdefault(c.uid, c)

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
        # Liveness: nothing that could go was left behind (a suspect waits while one is out).
        suspect_out = any(c.suspect for c in self.busy.values())
        for key in KEYS:
            head = self.head(key)
            if head is not None and key not in self.busy and not (head.suspect and suspect_out):
                assert head.due > self.now, f"key {key}: due head {head.uid} not handed out"
        return multiple(*taken)

    def check_taken(self, taken: list[Item], limit: int) -> None:
        assert len(taken) <= limit
        keys = [c.key for c in taken]
        assert len(keys) == len(set(keys)), "two heads of one key handed out at once"
        for c in taken:
            assert c.key not in self.busy, f"key {c.key} handed out while {self.busy} is out"
            assert c.uid in self.buffered, f"{c.uid} was never held, or was dropped/finished"
            head = self.head(c.key)
            assert head is c, f"key {c.key}: took {c.uid} but its head is {head and head.uid}"
            assert c.due <= self.now, f"{c.uid} taken before it was due"
            self.busy[c.key] = c
        suspects = [c.uid for c in self.busy.values() if c.suspect]
        assert len(suspects) <= 1, f"crash suspects {suspects} out at once"

    @rule(item=consumes(out))
    def finish(self, item: Item) -> None:
        self.s.finish(item, self.now)
        if self.busy.get(item.key) is item:
            del self.busy[item.key]
            del self.buffered[item.uid]
            self.kept_busy.discard(item.uid)

    @rule(item=consumes(out))
    def unstart(self, item: Item) -> None:
        """Its start was refused: the key is idle again with the same head."""
        self.s.unstart(item, self.now)
        if self.busy.get(item.key) is item:
            del self.busy[item.key]
            self.kept_busy.discard(item.uid)
            if item.uid not in self.buffered:
                return

    @rule(key=st.sampled_from(KEYS), keep_busy=st.booleans())
    def drop_key(self, key: str, keep_busy: bool) -> None:
        """The key went to the parked queue: forget it (a head that is out may stay)."""
        busy = self.busy.get(key)
        expected = {
            c.uid for c in self.buffered.values() if c.key == key and not (keep_busy and busy is c)
        }
        dropped = self.s.drop_key(key, keep_busy=keep_busy)
        assert {c.uid for c in dropped} == expected
        for uid in expected:
            del self.buffered[uid]
        if busy is not None and not keep_busy:
            del self.busy[key]

    @rule(partition=st.sampled_from([0, 1, 2]), keep_busy=st.booleans())
    def drop_partition(self, partition: int, keep_busy: bool) -> None:
        expected = {
            c.uid
            for c in self.buffered.values()
            if c.partition == partition and not (keep_busy and self.busy.get(c.key) is c)
        }
        dropped = self.s.drop_partition(partition, keep_busy=keep_busy)
        assert {c.uid for c in dropped} == expected
        assert len(dropped) == len(expected)
        for uid in expected:
            del self.buffered[uid]
        for key, c in list(self.busy.items()):
            if c.partition != partition:
                continue
            if keep_busy:
                self.kept_busy.add(c.uid)
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


def test_head_not_due_blocks_later_messages_of_its_key() -> None:
    s = KeyScheduler()
    a1, a2, b1 = claimed(1, "a", 5.0), claimed(2, "a", 0.0), claimed(3, "b", 0.0)
    s.add([a1, a2, b1], now=0.0)
    assert s.take(0.0, 10) == [b1]  # a2 is due but must wait for a1
    assert s.next_due() == 5.0
    assert s.take(5.0, 10) == [a1]
    s.finish(a1, 5.0)
    assert s.take(5.0, 10) == [a2]


def test_a_keys_parked_messages_come_before_its_log_messages() -> None:
    """After a hand-off the new owner may read a key's log messages before it loads the
    key's parked ones: those still go first."""
    s = KeyScheduler()
    log_item = claimed(10, "a", 0.0)
    s.add([log_item], now=0.0)
    parked_item = claimed(99, "a", 0.0, parked=True)
    s.add([parked_item], now=0.0)
    assert s.take(0.0, 10) == [parked_item]
    s.finish(parked_item, 0.0)
    assert s.take(0.0, 10) == [log_item]


def test_a_parked_message_not_due_blocks_its_key() -> None:
    s = KeyScheduler()
    s.add([claimed(10, "a", 0.0), claimed(11, "b", 0.0)], now=0.0)
    s.add([claimed(5, "a", 3.0, parked=True)], now=0.0)  # a retry, waiting
    assert [c.key for c in s.take(0.0, 10)] == ["b"]
    assert [c.uid for c in s.take(3.0, 10)] == [-5]


def test_a_message_that_sorts_earlier_goes_after_the_head_being_handled() -> None:
    s = KeyScheduler()
    s.add([claimed(10, "a", 0.0), claimed(11, "a", 0.0)], now=0.0)
    (head,) = s.take(0.0, 10)
    s.add([claimed(5, "a", 0.0, parked=True)], now=0.0)
    assert s.take(0.0, 10) == []
    s.finish(head, 0.0)
    assert [c.uid for c in s.take(0.0, 10)] == [-5]


def test_an_unstarted_head_is_handed_out_again() -> None:
    s = KeyScheduler()
    a1, a2 = claimed(1, "a", 0.0), claimed(2, "a", 0.0)
    s.add([a1, a2], now=0.0)
    assert s.take(0.0, 10) == [a1]
    s.unstart(a1, 0.0)
    assert s.take(0.0, 10) == [a1]


def test_dropping_a_key_keeps_its_running_head() -> None:
    s = KeyScheduler()
    a1, a2 = claimed(1, "a", 0.0), claimed(2, "a", 0.0)
    s.add([a1, a2], now=0.0)
    (head,) = s.take(0.0, 10)
    assert s.drop_key("a") == [a2]
    assert s.busy() == 1 and s.buffered() == 1
    s.finish(head, 0.0)
    assert s.buffered() == 0 and s.take(0.0, 10) == []


def test_crash_suspects_are_handed_out_one_at_a_time() -> None:
    """A crash charges every message that was running; the ones charged run one at a time,
    so the next crash falls on the one that caused it, not on healthy ones beside it."""
    s = KeyScheduler()
    p, h1, h2 = (claimed(i, k, 0.0, parked=True, suspect=True) for i, k in enumerate("abc"))
    fresh = claimed(10, "d", 0.0)
    s.add([p, h1, h2, fresh], now=0.0)
    assert s.take(0.0, 10) == [fresh, p]  # messages not charged run beside a suspect
    assert s.ready_count(0.0) == 0 and s.take(0.0, 10) == []
    s.finish(p, 0.0)
    assert s.take(0.0, 10) == [h1]
    s.unstart(h1, 0.0)  # its start was refused: it waits its turn again
    (again,) = s.take(0.0, 10)
    # Dropped while out (its key was parked): the next may go.
    assert s.drop_key(again.key, keep_busy=False) == [again]
    assert s.take(0.0, 10) == [h2 if again is h1 else h1]


def test_the_suspect_charged_least_often_goes_first() -> None:
    """A message that crashes its consumer on every delivery is charged at every crash;
    the healthy ones charged beside it once are not charged again while they wait. So
    after its first crash as a suspect it goes after them."""
    s = KeyScheduler()
    p, h = claimed(1, "a", 0.0, parked=True, suspect=True), claimed(2, "b", 0.0, parked=True,
                                                                     suspect=True)  # fmt: skip
    p.message = dataclasses.replace(p.message, attempt=3)
    h.message = dataclasses.replace(h.message, attempt=2)
    s.add([p, h], now=0.0)
    assert s.take(0.0, 10) == [h]
    s.finish(h, 0.0)
    assert s.take(0.0, 10) == [p]


def test_a_message_parked_after_its_key_was_dropped_can_be_loaded_again() -> None:
    s = KeyScheduler()
    a1 = claimed(1, "a", 0.0)
    s.add([a1], now=0.0)
    (head,) = s.take(0.0, 10)
    assert s.drop_key("a", keep_busy=False) == [head]
    s.reidentify(head, 77)  # the park's answer came after the key left memory
    assert not s.holds(-77)
    assert s.add([claimed(77, "a", 0.0, parked=True)], now=0.0) == 1
