"""A consumer is ready when it holds its assignment, or the group has nothing for it: the
rule on its own, then consumers against a real database moving through join, hand-off
and idle standby."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgcg.consumer.message import Message
from pgcg.consumer.observer import ConsumerObserver
from pgcg.consumer.readiness import Expectation, holds_assignment
from pgcg.consumer.service import Consumer
from tests.helpers import COORD, assign, await_for, fast_settings, running

TOPIC = "orders"


def expect(
    partitions: int, members: int, assigned: set[int], incoming: set[int] | None = None
) -> Expectation:
    return Expectation(partitions, members, frozenset(assigned), frozenset(incoming or ()))


# === the rule ===================================================================================


def test_ready_when_it_holds_what_the_database_assigns_and_its_share():
    ok, why = holds_assignment({0: "assigned", 1: "assigned"}, expect(4, 2, {0, 1}))
    assert ok and why == "holds its 2 partition(s)"


def test_not_ready_before_the_first_rebalance_gives_it_anything():
    ok, why = holds_assignment({}, expect(16, 5, set()))
    assert not ok
    assert why == "holds 0 of at least 3 partitions (16 over 5 members): waiting for a rebalance"


def test_not_ready_while_a_partition_is_on_its_way_to_it():
    ok, why = holds_assignment({0: "assigned", 1: "assigned"}, expect(8, 4, {0, 1}, {5}))
    assert (ok, why) == (False, "waiting for partitions [5] to be handed over")


def test_not_ready_until_it_started_on_what_the_database_gave_it():
    ok, why = holds_assignment({0: "assigned"}, expect(4, 2, {0, 1}))
    assert (ok, why) == (False, "assigned partitions [1], not started on them yet")


def test_partitions_it_is_giving_away_do_not_count_as_held():
    owned = {0: "assigned", 1: "revoking", 2: "revoking"}
    assert holds_assignment(owned, expect(6, 3, {0}))[0] is False
    assert holds_assignment({**owned, 3: "assigned"}, expect(6, 3, {0, 3}))[0] is True


def test_an_idle_standby_is_ready_when_the_group_has_nothing_for_it():
    ok, why = holds_assignment({}, expect(2, 3, set()))
    assert (ok, why) == (True, "nothing to hold: 3 members for 2 partitions")


@pytest.mark.parametrize("members", [0, 1])
def test_a_member_not_yet_counted_is_held_to_the_whole_group(members):
    """Members counted 0 (its join not visible yet) must not divide by zero or pass."""
    assert holds_assignment({}, expect(4, members, set()))[0] is False


# === consumers against the database ==============================================================


async def noop(message: Message) -> None:
    return None


def consumer(dsn: str, group: str) -> tuple[Consumer, ConsumerObserver]:
    settings = fast_settings({"drain_deadline": 2}, {})
    member = Consumer(settings, group=group, topic=TOPIC, handler=noop, dsn=dsn)
    return member, ConsumerObserver(member, lag_interval=60)


async def ready(observer: ConsumerObserver) -> tuple[bool, str]:
    await observer.assignment_check.refresh(observer.ctx.member_id)
    return observer.ready()


@pytest.mark.anyio
async def test_a_joining_member_is_ready_once_its_hand_off_completed(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    group = "handoff"
    db.execute("SELECT pgcg.create_topic(%s, 4)", (TOPIC,))
    a, a_obs = consumer(dsn, group)
    b, b_obs = consumer(dsn, group)
    try:
        async with running(a):
            ok, why = await ready(a_obs)
            assert not ok and why.endswith("holds 0 of at least 4 partitions (4 over 1 members)"
                                           ": waiting for a rebalance")  # fmt: skip

            assign(db, group, TOPIC, [0, 1], a.member_id)
            # 2 and 3 belong to a member that is gone and never releases (no process).
            assign(db, group, TOPIC, [2, 3], "gone-member")
            await await_for(lambda: len(a.ctx.assignment.owned) == 2, 10, "a owns 0 and 1")
            assert not (await ready(a_obs))[0], "2 of at least 4: a must wait for more"

            async with running(b):
                # Two live members: a's two are its share; b, joined with nothing, waits.
                assert (await ready(a_obs))[0]
                ok, why = await ready(b_obs)
                assert not ok and "holds 0 of at least 2 partitions" in why

                # The leader moves 2 and 3 to b: until they are handed over, b waits.
                db.execute(
                    COORD.revoke,
                    {"group": group, "topic": TOPIC, "partitions": [2, 3],
                     "targets": [b.member_id] * 2, "drain_deadline_s": 30},
                )  # fmt: skip
                ok, why = await ready(b_obs)
                assert not ok and why.endswith("waiting for partitions [2, 3] to be handed over")

                # Forced to b (the owner never released): b is ready once it started on them.
                assign(db, group, TOPIC, [2, 3], b.member_id)

                async def b_ready() -> bool:
                    return (await ready(b_obs))[0]

                await await_for(b_ready, 10, "b ready once 2 and 3 are its")
                assert sorted(b.ctx.assignment.owned) == [2, 3]
                assert (await ready(a_obs))[0], "a still holds its share, 0 and 1"
    finally:
        a_obs.close()
        b_obs.close()


@pytest.mark.anyio
async def test_a_standby_beyond_the_partition_count_is_ready_holding_nothing(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    group = "standby"
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    a, a_obs = consumer(dsn, group)
    b, b_obs = consumer(dsn, group)
    try:
        async with running(a, b):
            assign(db, group, TOPIC, [0], a.member_id)
            await await_for(lambda: len(a.ctx.assignment.owned) == 1, 10, "a owns 0")
            assert (await ready(a_obs))[0]
            ok, why = await ready(b_obs)
            assert ok and why.endswith("nothing to hold: 2 members for 1 partitions")
    finally:
        a_obs.close()
        b_obs.close()


@pytest.mark.anyio
async def test_not_ready_after_a_rejoin_until_checked_for_the_new_member_id(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    group = "rejoin"
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    a, a_obs = consumer(dsn, group)
    try:
        async with running(a):
            assign(db, group, TOPIC, [0], a.member_id)
            await await_for(lambda: len(a.ctx.assignment.owned) == 1, 10, "a owns 0")
            assert (await ready(a_obs))[0]
            # What was checked is about an earlier member id (before a rejoin).
            a_obs.assignment_check.member_id = "an-earlier-incarnation"
            ok, why = a_obs.ready()
            assert not ok and why.endswith("assignment not checked yet")
    finally:
        a_obs.close()


@pytest.mark.anyio
async def test_readiness_follows_the_heartbeat_without_a_connection_of_its_own(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    """The expectation comes back on the heartbeat's round trip: with nobody refreshing it
    (the observer's loop not even running), readiness turns as the assignment does, and
    the member opens no connection to ask."""
    group = "riding"
    db.execute("SELECT pgcg.create_topic(%s, 2)", (TOPIC,))
    a, a_obs = consumer(dsn, group)
    try:
        async with running(a):
            await await_for(
                lambda: a_obs.ready()[1].endswith(
                    "holds 0 of at least 2 partitions (2 over 1 members): waiting for a rebalance"
                ),
                10,
                "not ready, by the heartbeat alone",
            )
            beats = a.heartbeat.round_trips
            assign(db, group, TOPIC, [0, 1], a.member_id)
            await await_for(lambda: a_obs.ready()[0], 10, "ready once it holds both")
            assert a.heartbeat.round_trips > beats
            names = {
                r["application_name"]
                for r in db.execute(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'pgcg-%%'"
                ).fetchall()
            }
            assert names and not any("readiness" in n for n in names), names
    finally:
        a_obs.close()
