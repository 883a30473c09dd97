"""The history checker (journal.check) on histories written by hand: each violation it
names is caught, and a clean history passes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgcg.bench.chaos import journal
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries
from tests.helpers import assign

C = Queries("consumer")
J = Queries("journal")
GROUP, TOPIC = "g1", "orders"
A, B = "host-101-aaaa", "host-202-bbbb"

# A completion as the owner's fenced write records it (a 'd' ledger row), written here
# without the fence: the checker must judge it from the history alone.
COMPLETE = """
INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets)
SELECT l.slot, g.id, l.partition, 'd', g.seek_gen, %(epoch)s,
       (SELECT max(k.tick) FROM pgcg.ticks AS k JOIN pgcg.topics AS t ON t.id = k.topic_id
        WHERE t.name = g.topic),
       ARRAY[l."offset"]
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
JOIN pgcg.log AS l ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
WHERE g.group_name = %(group)s AND l.partition = %(partition)s AND l."offset" = %(offset)s
"""


class History:
    """One partition, one key: enqueue, own, handle and ack by hand, as processes would,
    for each of `groups` (every group consumes every message of the topic)."""

    def __init__(self, db: psycopg.Connection[Any], n: int, groups: tuple[str, ...] = (GROUP,)):
        self.db = db
        db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
        journal.create(db)
        for group in groups:
            db.execute(C.create_group, {"group": group, "topic": TOPIC})
        done = enqueue_many_sync(db, TOPIC, [OutgoingMessage("k", {"seq": s}) for s in range(n)])
        self.ids = [d.id for d in done]
        db.execute(
            J.produced,
            {"seqs": list(range(n)), "keys": ["k"] * n, "ids": self.ids, "poison": [None] * n},
        )

    def own(self, member: str, group: str = GROUP) -> int:
        assign(self.db, group, TOPIC, [0], member)
        row = self.db.execute(
            "SELECT epoch FROM pgcg.partition_assignments WHERE group_name = %s", (group,)
        ).fetchone()
        return int(row["epoch"])  # type: ignore[index]

    def handle(
        self,
        seq: int,
        member: str,
        epoch: int,
        start: datetime,
        end: datetime,
        pid: int,
        group: str = GROUP,
    ) -> None:
        self.db.execute(
            "INSERT INTO public.pgcg_journal (group_name, message_id, key, seq, partition, "
            "member_id, epoch, attempt, pid, proc, started_at, finished_at) "
            "VALUES (%s, %s, 'k', %s, 0, %s, %s, 1, %s, %s, %s, %s)",
            (group, self.ids[seq], seq, member, epoch, pid, member, start, end),
        )

    def ack(self, seq: int, member: str | None, epoch: int, group: str = GROUP) -> None:
        """The completion of `seq` by `member`'s process (None: by no process)."""
        with self.db.transaction():
            if member is not None:
                self.db.execute("SELECT set_config('pgcg.proc', %s, true)", (member,))
            cur = self.db.execute(
                COMPLETE,
                {"group": group, "partition": 0, "offset": self.ids[seq] // 1024, "epoch": epoch},
            )
            assert cur.rowcount == 1


_last = datetime.now(UTC)


def now() -> datetime:
    """The wall clock, strictly later than its last reading: the histories order events by
    their times, and the server's clock (ownership rows) runs beside this one."""
    global _last
    t = datetime.now(UTC)
    while t <= _last:
        t = datetime.now(UTC)
    _last = t
    return t


def test_a_clean_history_passes(db: psycopg.Connection[Any]) -> None:
    h = History(db, 3)
    epoch = h.own(A)
    for seq in range(3):
        h.handle(seq, A, epoch, now(), now(), 101)
        h.ack(seq, A, epoch)
    verdict = journal.check(db, TOPIC, disruptions=[])
    assert verdict.ok, verdict.examples()
    assert (verdict.handled, verdict.duplicates, verdict.attributed_acks) == (3, 0, 3)


def test_every_violation_is_named(db: psycopg.Connection[Any]) -> None:
    h = History(db, 4)
    old = h.own(A)
    h.handle(0, A, old, now(), now(), 101)
    h.ack(0, A, old)
    zombie_start = now()  # A starts seq 1, then pauses
    new = h.own(B)  # A's epoch ends
    h.handle(1, B, new, now(), now(), 202)
    h.handle(2, B, new, now(), now(), 202)  # B finishes seq 2 before seq 1 is acked
    h.handle(1, A, old, zombie_start, now(), 101)  # the zombie finishes seq 1
    h.ack(1, A, old)  # and its completion is accepted: no fence
    h.ack(2, B, new)
    late = now()
    h.handle(3, A, old, late, now(), 101)  # the zombie even starts new work
    h.ack(3, A, old)
    verdict = journal.check(db, TOPIC, disruptions=[])
    v = verdict.violations
    assert v["stale_acks"] == 2, verdict.stale_acks  # seqs 1 and 3
    assert v["stale_work"] == 1, verdict.stale_work  # seq 3 started after epoch `old` ended
    assert v["concurrent"] >= 1, verdict.concurrent_violations  # A's seq 1 spans B's seq 2
    assert v["unexplained_duplicates"] == 1  # seq 1 twice, and no fault was injected
    assert not verdict.ok


def test_a_message_handled_after_a_later_one_of_its_key(db: psycopg.Connection[Any]) -> None:
    h = History(db, 2)
    epoch = h.own(A)
    h.handle(1, A, epoch, now(), now(), 101)
    h.ack(1, A, epoch)
    h.handle(0, A, epoch, now(), now(), 101)
    h.ack(0, A, epoch)
    verdict = journal.check(db, TOPIC, disruptions=[])
    assert len(verdict.order_violations) == 1, verdict.order_violations


def test_lost_and_explained_duplicates(db: psycopg.Connection[Any]) -> None:
    h = History(db, 2)
    epoch = h.own(A)
    t0 = now()
    h.handle(0, A, epoch, t0, now(), 101)  # handled, then A is killed before its ack
    crash = journal.Disruption("consumer-kill", now(), None, pid=101)
    epoch = h.own(B)
    h.handle(0, B, epoch, now(), now(), 202)
    h.ack(0, B, epoch)
    h.ack(1, None, epoch)  # completed, yet nobody handled it
    verdict = journal.check(db, TOPIC, disruptions=[crash])
    assert verdict.lost == [1]
    assert verdict.duplicates == 1 and verdict.duplicate_causes == {"consumer-kill": 1}
    assert not verdict.unexplained_duplicates


@pytest.mark.parametrize("same_epoch", [True, False], ids=["lease-back", "hand-off"])
def test_a_handling_cut_off_before_its_completion_explains_a_repeat(
    db: psycopg.Connection[Any], same_epoch: bool
) -> None:
    """At-least-once without a fault: a handler cut off (its lease ran out, or the drain
    deadline passed) after its side effects were written, its completion never
    committed; the message is handled again, by the same member after the lease came
    back under the same epoch, or by the next owner."""
    h = History(db, 1)
    epoch = h.own(A)
    h.handle(0, A, epoch, now(), now(), 101)  # no completion follows
    member, pid = (A, 101) if same_epoch else (B, 202)
    if not same_epoch:
        epoch = h.own(B)
    h.handle(0, member, epoch, now(), now(), pid)
    h.ack(0, member, epoch)
    verdict = journal.check(db, TOPIC, disruptions=[])
    assert verdict.ok, verdict.examples()
    assert verdict.duplicates == 1 and verdict.duplicate_causes == {"interrupted": 1}


@pytest.mark.parametrize("ack_before_repeat", [True, False])
def test_a_repeat_after_a_completion_took_effect_is_caught(
    db: psycopg.Connection[Any], ack_before_repeat: bool
) -> None:
    """The member read its partition back, under the same epoch, before its own result
    landed (or after), and handled the message again: its completion did take effect, so
    the repeat is a violation. When the completion had been recorded before the repeat
    started, no fault excuses it."""
    h = History(db, 1)
    epoch = h.own(A)
    h.handle(0, A, epoch, now(), now(), 101)
    if ack_before_repeat:
        h.ack(0, A, epoch)
    fault = journal.Disruption("net-stall", now(), now(), pid=101)
    start = now()
    if not ack_before_repeat:
        h.ack(0, A, epoch)  # the first handling's completion lands while the repeat runs
    h.handle(0, A, epoch, start, now(), 101)
    h.ack(0, A, epoch)  # the repeat's
    verdict = journal.check(db, TOPIC, disruptions=[])
    assert len(verdict.unexplained_duplicates) == 1, verdict.examples()
    faulted = journal.check(db, TOPIC, disruptions=[fault])
    assert len(faulted.unexplained_duplicates) == (1 if ack_before_repeat else 0)


def test_stamps_after_sigcont_are_not_stale_work(db: psycopg.Connection[Any]) -> None:
    """A handler task dispatched just before SIGSTOP stamps its start after SIGCONT."""
    h = History(db, 1)
    old = h.own(A)
    pause_start = now()
    h.own(B)
    pause_end = now()
    start = pause_end + timedelta(milliseconds=5)
    h.handle(0, A, old, start, start + timedelta(milliseconds=2), 101)
    pause = journal.Disruption("consumer-pause", pause_start, pause_end, pid=101)
    assert journal.check(db, TOPIC, disruptions=[]).stale_work
    verdict = journal.check(db, TOPIC, disruptions=[pause])
    assert not verdict.stale_work and verdict.resumed_starts == 1


@pytest.mark.parametrize("epochs", [[3, 4, 2], [5, 5, 6]])
def test_a_deposed_leader_writing_is_caught(db: psycopg.Connection[Any], epochs: list[int]) -> None:
    History(db, 1)
    for generation, epoch in enumerate(epochs, start=1):
        db.execute(
            "INSERT INTO pgcg.rebalances (group_name, generation, leader_epoch, reason, "
            "members, moves, started_at, duration_ms) "
            "VALUES (%s, %s, %s, 'test', 1, '[]', now(), 1)",
            (GROUP, generation, epoch),
        )
    stale = journal.check(db, TOPIC).stale_leader_writes
    assert len(stale) == (1 if epochs == [3, 4, 2] else 0), stale


def test_every_group_is_checked_on_its_own(db: psycopg.Connection[Any]) -> None:
    """Each group must handle every message in key order; what one group did never
    covers for another, and two groups handling one key at once is no violation."""
    h = History(db, 2, groups=("g1", "g2", "g3"))
    e1, e2, e3 = h.own(A, "g1"), h.own(A, "g2"), h.own(B, "g3")
    g2_start = now()
    for seq in range(2):
        h.handle(seq, A, e1, now(), now(), 101, "g1")  # inside g2's handling of seq 0
        h.ack(seq, A, e1, "g1")
    h.handle(0, A, e2, g2_start, now(), 101, "g2")
    h.ack(0, A, e2, "g2")
    h.handle(1, A, e2, now(), now(), 101, "g2")
    h.ack(1, A, e2, "g2")
    h.handle(1, B, e3, now(), now(), 202, "g3")  # g3 skips seq 0 ...
    h.ack(1, B, e3, "g3")
    h.handle(0, B, e3, now(), now(), 202, "g3")  # ... and handles it after seq 1
    h.ack(0, B, e3, "g3")
    verdict = journal.check(db, TOPIC, disruptions=[], groups=["g1", "g2", "g3", "g4"])
    assert set(verdict.groups) == {"g1", "g2", "g3", "g4"}
    assert verdict.groups["g1"].ok and verdict.groups["g2"].ok, verdict.examples()
    assert len(verdict.groups["g3"].order_violations) == 1
    assert verdict.order_violations[0].startswith("[g3] ")
    # g4 never came to be: it handled nothing, so it lost everything.
    assert verdict.groups["g4"].lost == [0, 1] and verdict.lost == [0, 1]
    assert verdict.handled == 0 and verdict.groups["g1"].handled == 2
    assert not verdict.ok


def test_a_group_missing_a_message_loses_it(db: psycopg.Connection[Any]) -> None:
    h = History(db, 2, groups=("g1", "g2"))
    e1, e2 = h.own(A, "g1"), h.own(B, "g2")
    for seq in range(2):
        h.handle(seq, A, e1, now(), now(), 101, "g1")
        h.ack(seq, A, e1, "g1")
    h.handle(1, B, e2, now(), now(), 202, "g2")
    h.ack(1, B, e2, "g2")
    h.ack(0, None, e2, "g2")  # g2's position moved past seq 0, which it never handled
    verdict = journal.check(db, TOPIC, disruptions=[])
    assert verdict.groups["g1"].ok
    assert verdict.groups["g2"].lost == [0] and verdict.lost == [0]
    assert verdict.handled == 1  # seq 1: handled by every group
    assert "lost seqs [g2]: [0]" in verdict.examples()
