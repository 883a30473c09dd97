"""The rebalance's own safety: its deadlines count from when it holds its locks, its lock
waits are bounded, members are expired on the coordinator's clock (an injected clock
stands in for it; the database's clock step is stood in for by moving last_heartbeat), and
hand-offs are forced only once the drain deadline has passed on both clocks (the
database's stepped for real, by libfaketime in a server of the test's own)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.bench.throwaway import ThrowawayPostgres
from pgcg.coordinator.drains import DrainWatch
from pgcg.coordinator.expiry import MemberWatch
from pgcg.coordinator.rebalancer import Outcome, rebalance
from pgcg.coordinator.service import Coordinator
from pgcg.shared.db import connect, translate
from pgcg.shared.errors import Contention, DatabaseUnavailable
from pgcg.shared.queries import Queries
from tests.helpers import FakeClock, assign, await_for, fast_settings, owners, wait_for

pytestmark = pytest.mark.anyio

GROUP = "g1"
TOPIC = "orders"
LEADER = "leader-1"
SESSION_TIMEOUT_MS = 3000
DRAIN_DEADLINE = 2.0
APP = "pgcg-test-rebalance"
COORD = Queries("coordinator")
CONSUMER = Queries("consumer")


def join(db: psycopg.Connection[Any], member: str) -> None:
    db.execute(
        CONSUMER.join,
        {
            "group": GROUP,
            "member": member,
            "host": "test",
            "pid": 1,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
        },
    )


def setup_group(db: psycopg.Connection[Any]) -> int:
    """Four partitions owned by member a, member b just joined; our leader's epoch."""
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s, 'earliest')", (GROUP, TOPIC))
    join(db, "a")
    join(db, "b")
    assign(db, GROUP, TOPIC, [0, 1, 2, 3], "a")
    params = {"scope": GROUP, "leader": LEADER}
    db.execute(COORD.ensure_leader_row, params)
    row = db.execute(COORD.take_leadership, params).fetchone()
    assert row is not None
    return int(row["leader_epoch"])


def waiting_on_lock(db: psycopg.Connection[Any]) -> bool:
    row = db.execute(
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE application_name = %s AND wait_event_type = 'Lock'",
        (APP,),
    ).fetchone()
    return bool(row and row["n"])


def lock_assignments(dsn: str) -> psycopg.Connection[Any]:
    """A session that holds every assignment row of the group until it commits."""
    holder = psycopg.connect(dsn, row_factory=dict_row)
    holder.execute(
        "SELECT partition FROM pgcg.partition_assignments WHERE group_name = %s FOR UPDATE",
        (GROUP,),
    ).fetchall()
    return holder


async def run_rebalance(
    dsn: str,
    epoch: int,
    lock_timeout: float,
    drains: DrainWatch | None = None,
    leader: str = LEADER,
) -> Outcome | None:
    conn = await connect(dsn, application_name=APP)
    try:
        return await rebalance(
            conn,
            group=GROUP,
            topic=TOPIC,
            leader_id=leader,
            leader_epoch=epoch,
            leader_timeout=60,
            drain_deadline=DRAIN_DEADLINE,
            reason="test",
            lock_timeout=lock_timeout,
            drains=drains,
        )
    finally:
        await conn.close()


def state(db: psycopg.Connection[Any]) -> tuple[Any, ...]:
    generation = db.execute(
        "SELECT generation FROM pgcg.groups WHERE group_name = %s", (GROUP,)
    ).fetchone()
    recorded = db.execute(
        "SELECT count(*) AS n FROM pgcg.rebalances WHERE group_name = %s", (GROUP,)
    ).fetchone()
    deadlines = db.execute(
        "SELECT array_agg(revoke_deadline ORDER BY partition) AS d "
        "FROM pgcg.partition_assignments WHERE group_name = %s",
        (GROUP,),
    ).fetchone()
    assert generation and recorded and deadlines
    return owners(db, GROUP), generation["generation"], recorded["n"], deadlines["d"]


async def test_revoke_deadline_counts_from_when_the_rows_are_locked(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    epoch = setup_group(db)
    holder = lock_assignments(dsn)
    result: list[Outcome | None] = []
    try:
        async with anyio.create_task_group() as tg:

            async def go() -> None:
                result.append(await run_rebalance(dsn, epoch, lock_timeout=120))

            tg.start_soon(go)
            await await_for(lambda: waiting_on_lock(db), 20, "the rebalance to wait on the lock")
            # Meanwhile an owner's heartbeat still reads `assigned` and renews its lease
            # from about now: the forced hand-off must not come before that lease ends.
            row = holder.execute("SELECT clock_timestamp() AS t").fetchone()
            assert row is not None
            released_at = row["t"]
            holder.commit()
    finally:
        holder.close()
    assert result and result[0] is not None
    assert {m.kind for m in result[0].moves} == {"revoke"}
    deadlines = db.execute(
        "SELECT partition, revoke_deadline FROM pgcg.partition_assignments "
        "WHERE group_name = %s AND state = 'revoking'",
        (GROUP,),
    ).fetchall()
    assert deadlines, "some partitions are being revoked from a for b"
    lease = timedelta(milliseconds=max(SESSION_TIMEOUT_MS, DRAIN_DEADLINE * 1000))
    for r in deadlines:
        assert r["revoke_deadline"] >= released_at + lease, (
            f"partition {r['partition']}: the hand-off would be forced at "
            f"{r['revoke_deadline']}, before a lease renewed at {released_at} ends"
        )


async def test_a_rebalance_stuck_on_a_lock_gives_up_without_writing(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    epoch = setup_group(db)
    before = state(db)
    holder = lock_assignments(dsn)
    try:
        # The lock outlives the bound: the rebalance gives up, and nothing was written.
        with pytest.raises(Contention):
            await run_rebalance(dsn, epoch, lock_timeout=0.2)
        assert state(db) == before
    finally:
        holder.rollback()
        holder.close()
    # Once the lock is gone the same rebalance goes through.
    outcome = await run_rebalance(dsn, epoch, lock_timeout=0.2)
    assert outcome is not None and {m.kind for m in outcome.moves} == {"revoke"}
    assert state(db) != before


def test_a_rebalance_paused_before_its_commit_is_ended_by_the_server(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A leader paused between its writes and its commit (SIGSTOP, a stalled host) holds a
    revocation nobody sees while its drain deadline runs; committed late, it would leave the
    owner less than a drain. The server ends the transaction once it idles past the bound."""
    setup_group(db)
    before = owners(db, GROUP)
    with psycopg.connect(dsn, application_name=APP) as leader:
        pid = leader.info.backend_pid
        leader.execute(COORD.bound_lock_waits, {"lock_timeout_ms": 200, "idle_timeout_ms": 300})
        leader.execute(
            "UPDATE pgcg.partition_assignments SET state = 'revoking', target_member_id = 'b', "
            "revoke_deadline = clock_timestamp() + interval '2 s' "
            "WHERE group_name = %s AND partition = 0",
            (GROUP,),
        )

        def ended() -> bool:
            row = db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s", (pid,))
            return row.fetchone()["n"] == 0  # type: ignore[index]

        # The paused leader: no statement for longer than the bound.
        wait_for(ended, 20, "the server to end the idle rebalance transaction")
        with pytest.raises(psycopg.Error, match="idle-in-transaction timeout") as ended_by:
            leader.commit()
    # To the coordinator, a lost connection like any other: it reconnects and runs again.
    assert isinstance(translate(ended_by.value), DatabaseUnavailable)
    assert owners(db, GROUP) == before


def member_ids(db: psycopg.Connection[Any]) -> set[str]:
    rows = db.execute(
        "SELECT member_id FROM pgcg.consumer_groups WHERE group_name = %s", (GROUP,)
    ).fetchall()
    return {r["member_id"] for r in rows}


def heartbeat(db: psycopg.Connection[Any], member: str) -> None:
    db.execute(CONSUMER.heartbeat, {"group": GROUP, "member": member}).fetchall()


async def test_members_expire_on_the_coordinators_clock_not_the_databases(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s, 'earliest')", (GROUP, TOPIC))
    join(db, "a")
    join(db, "b")
    clock = FakeClock()
    session_timeout = SESSION_TIMEOUT_MS / 1000
    coordinator = Coordinator(
        fast_settings({}, {"session_timeout": session_timeout}), dsn=dsn, clock=clock
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(coordinator.run_until_stopped)
        await await_for(
            lambda: {m for m, _, _ in owners(db, GROUP).values()} == {"a", "b"},
            30,
            "the leader to share the partitions between a and b",
        )
        # The database host's clock steps forward an hour: by now() - last_heartbeat both
        # members have been silent for an hour, though their leases are still valid.
        db.execute(
            "UPDATE pgcg.consumer_groups SET last_heartbeat = last_heartbeat - interval '1 hour' "
            "WHERE group_name = %s",
            (GROUP,),
        )
        await coordinator.rebalance_group(GROUP, "test")
        assert member_ids(db) == {"a", "b"}, "expired on the database's clock"
        clock.advance(session_timeout / 2)
        await coordinator.rebalance_group(GROUP, "test")
        assert member_ids(db) == {"a", "b"}, "expired before a session timeout went by"
        # b heartbeats, a stays silent; a session timeout later on the coordinator's clock
        # a is expired, b is not.
        clock.advance(session_timeout / 2)
        heartbeat(db, "b")
        await coordinator.rebalance_group(GROUP, "test")
        assert member_ids(db) == {"b"}
        assert {m for m, _, _ in owners(db, GROUP).values()} == {"b"}
        await coordinator.stop()


def test_a_new_leader_waits_a_whole_session_timeout_before_expiring_anyone() -> None:
    clock = FakeClock()
    watch = MemberWatch(clock)
    silent_for_long = [
        {
            "member_id": "a",
            "last_heartbeat": datetime(2000, 1, 1, tzinfo=UTC),
            "session_timeout_ms": 3000,
        }
    ]
    assert watch.observe(GROUP, silent_for_long) == []
    clock.advance(2.9)
    assert watch.observe(GROUP, silent_for_long) == []
    clock.advance(0.1)
    assert watch.observe(GROUP, silent_for_long) == silent_for_long
    # Leading again after a gap: what was seen before counts for nothing.
    watch.forget(GROUP)
    assert watch.observe(GROUP, silent_for_long) == []


# What the revocation gives owner a to drain: the drain deadline, never less than its
# session timeout.
DRAIN = max(DRAIN_DEADLINE, SESSION_TIMEOUT_MS / 1000)


def forced(outcome: Outcome | None) -> set[int]:
    return {m.partition for m in outcome.moves if m.kind == "forced"} if outcome else set()


@pytest.mark.parametrize("step", [30.0, -30.0], ids=["forward", "backward"])
async def test_a_forced_hand_off_waits_for_the_drain_on_both_clocks(
    stepped_server: ThrowawayPostgres, stepped_dsn: str, step: float
) -> None:
    """A revoked owner counts its drain down on its own clock, from the deadline as it read
    it. The database's clock stepping forward during the drain, or put right during the
    drain after it was behind when the revocation was issued, brings the row's deadline
    closer by the step; forcing the hand-off then would start the next owner beside the
    handlers the old one still runs. The leader waits for the drain on its own clock too."""
    with psycopg.connect(stepped_dsn, autocommit=True, row_factory=dict_row) as db:
        epoch = setup_group(db)
        clock = FakeClock()
        drains = DrainWatch(clock)
        if step < 0:
            stepped_server.step_clock(step)  # behind as the revocation is issued
        first = await run_rebalance(stepped_dsn, epoch, 5, drains)
        assert first is not None
        revoked = {m.partition for m in first.moves if m.kind == "revoke"}
        assert revoked, "some partitions are being revoked from a for b"
        stepped_server.step_clock(max(step, 0.0))  # forward, or put right
        due = db.execute(
            "SELECT bool_and(revoke_deadline <= clock_timestamp()) AS due "
            "FROM pgcg.partition_assignments WHERE group_name = %s AND state = 'revoking'",
            (GROUP,),
        ).fetchone()
        assert due is not None and due["due"], "past the deadline on the database's clock"
        before = owners(db, GROUP)
        clock.advance(DRAIN - 0.1)
        assert forced(await run_rebalance(stepped_dsn, epoch, 5, drains)) == set()
        assert owners(db, GROUP) == before, "forced before the owner's drain ran its course"
        clock.advance(0.1)
        assert forced(await run_rebalance(stepped_dsn, epoch, 5, drains)) == revoked
        assert {p for p, (m, _, _) in owners(db, GROUP).items() if m == "b"} == revoked


async def test_a_new_leader_waits_a_whole_drain_before_forcing_a_hand_off(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """A leader that took over during a revocation did not see it start: however long ago
    the database's clock says it was, the owner may have heard of it only just before the
    takeover, so the new leader counts a whole drain from when it first saw it."""
    epoch = setup_group(db)
    first = await run_rebalance(dsn, epoch, 5, DrainWatch(FakeClock()))
    assert first is not None
    revoked = {m.partition for m in first.moves if m.kind == "revoke"}
    assert revoked
    db.execute(
        "UPDATE pgcg.partition_assignments SET revoke_deadline = clock_timestamp() "
        "- interval '1 minute' WHERE group_name = %s AND state = 'revoking'",
        (GROUP,),
    )
    row = db.execute(COORD.take_leadership, {"scope": GROUP, "leader": "leader-2"}).fetchone()
    assert row is not None
    new_epoch, clock = int(row["leader_epoch"]), FakeClock()
    drains = DrainWatch(clock)
    before = owners(db, GROUP)
    assert forced(await run_rebalance(dsn, new_epoch, 5, drains, "leader-2")) == set()
    clock.advance(DRAIN - 0.1)
    assert forced(await run_rebalance(dsn, new_epoch, 5, drains, "leader-2")) == set()
    assert owners(db, GROUP) == before
    clock.advance(0.1)
    assert forced(await run_rebalance(dsn, new_epoch, 5, drains, "leader-2")) == revoked
    # Leading again after a gap: what was seen before counts for nothing.
    drains.forget(GROUP)
    row = {"partition": 0, "epoch": 9, "state": "revoking", "member_id": "a", "overdue": True}
    assert drains.overdue(GROUP, [row], {"a": 1.0}) == set()
