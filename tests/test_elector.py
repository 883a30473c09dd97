"""Leader election in-process: two Electors on one group, the leader silenced by ageing its
heartbeat (what a paused process looks like to the database)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgcg.coordinator.elector import Elector

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
