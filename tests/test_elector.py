"""Leader election in-process: two Electors on one group, the leader silenced by ageing its
heartbeat (what a paused process looks like to the database)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgcg.coordinator.elector import Elector
from tests.test_privileges import _documented_grants

pytestmark = pytest.mark.anyio

GROUP = "g-elect"


async def test_standby_leads_in_the_round_that_deposes_a_silent_leader(
    db: psycopg.Connection[Any], dsn: str
) -> None:
    leader = Elector(dsn, leader_timeout=2.0)
    standby = Elector(dsn, leader_timeout=2.0)
    try:
        assert await leader.tick([GROUP]) == [GROUP]
        epoch = leader.leader_epoch(GROUP)
        assert epoch is not None
        assert await standby.tick([GROUP]) == []  # the leader's heartbeat is fresh

        db.execute(
            "UPDATE pgcg.coordinator_leader SET heartbeat_at = now() - interval '1 hour' "
            "WHERE scope = %s",
            (GROUP,),
        )
        # Terminating the silent leader's session frees its lock; the standby takes it in
        # the same round instead of one election interval later.
        assert await standby.tick([GROUP]) == [GROUP]
        assert standby.leader_epoch(GROUP) == epoch + 1

        # The old leader wakes up to a terminated session: it leads nothing.
        assert await leader.tick([GROUP]) == []
        assert leader.leader_epoch(GROUP) is None
    finally:
        await leader.close()
        await standby.close()


def _age_leader(db: psycopg.Connection[Any]) -> None:
    db.execute(
        "UPDATE pgcg.coordinator_leader SET heartbeat_at = now() - interval '1 hour' "
        "WHERE scope = %s",
        (GROUP,),
    )


def _alive(db: psycopg.Connection[Any], pid: int) -> bool:
    row = db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s", (pid,))
    return bool(row.fetchone()["n"])  # type: ignore[index]


async def test_a_forged_backend_pid_is_not_terminated(
    db: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can write the leader row cannot aim a standby at another backend: only the
    holder of the group's leader lock is terminated."""
    caplog.set_level(logging.DEBUG, logger="pgcg.coordinator.elector")
    leader = Elector(dsn, leader_timeout=2.0)
    standby = Elector(dsn, leader_timeout=2.0)
    with psycopg.connect(dsn, autocommit=True) as victim:
        victim_pid = victim.info.backend_pid
        try:
            assert await leader.tick([GROUP]) == [GROUP]
            _age_leader(db)
            db.execute(
                "UPDATE pgcg.coordinator_leader SET backend_pid = %s WHERE scope = %s",
                (victim_pid, GROUP),
            )
            assert await standby.tick([GROUP]) == []
            assert await standby.tick([GROUP]) == []
            assert victim.execute("SELECT 1").fetchone() == (1,)  # still connected
            refusals = [r for r in caplog.records if r.__dict__.get("action") ==
                        "leader_pid_mismatch"]  # fmt: skip
            assert [r.levelno for r in refusals] == [logging.ERROR, logging.DEBUG]
            assert refusals[0].__dict__["backend_pid"] == victim_pid

            # The real holder's pid back in the row: the silent leader is deposed.
            leader_pid = db.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objid = hashtext(%s)::oid",
                (GROUP,),
            ).fetchone()["pid"]  # type: ignore[index]
            db.execute(
                "UPDATE pgcg.coordinator_leader SET backend_pid = %s WHERE scope = %s",
                (leader_pid, GROUP),
            )
            assert await standby.tick([GROUP]) == [GROUP]
            assert not _alive(db, leader_pid) and _alive(db, victim_pid)
        finally:
            await leader.close()
            await standby.close()


async def test_coordinators_of_different_roles_need_pg_signal_backend(
    db: psycopg.Connection[Any], make_role: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Deposing another role's silent leader is refused without pg_signal_backend: the
    standby says so in one line and stays a standby; with it, the standby takes over."""
    caplog.set_level(logging.DEBUG, logger="pgcg.coordinator.elector")
    grants = _documented_grants("coordinator", "orders")  # as `pgcg roles` gives, no more
    first, second = make_role(*grants), make_role(*grants)
    leader = Elector(first, leader_timeout=2.0)
    standby = Elector(second, leader_timeout=2.0)
    try:
        assert await leader.tick([GROUP]) == [GROUP]
        _age_leader(db)
        assert await standby.tick([GROUP]) == []
        assert await standby.tick([GROUP]) == []
        (denied, again) = [r for r in caplog.records
                           if r.__dict__.get("action") == "leader_depose_denied"]  # fmt: skip
        assert (denied.levelno, again.levelno) == (logging.ERROR, logging.DEBUG)
        message = denied.getMessage()
        assert "pg_signal_backend" in message and "\n" not in message
        assert leader._conn is not None and _alive(db, leader._conn.info.backend_pid)

        standby_role = psycopg.conninfo.conninfo_to_dict(second)["user"]
        db.execute(f'GRANT pg_signal_backend TO "{standby_role}"')
        assert await standby.tick([GROUP]) == [GROUP]
        assert await leader.tick([GROUP]) == []
    finally:
        await leader.close()
        await standby.close()
