"""The group protocol with real processes: two coordinators, three consumers, a producer,
and every failure the issue names, each proven by waiting on a condition with a deadline.
Throughout, the run journal is checked: no loss, key order kept, no key handled by two
members at once."""

from __future__ import annotations

import collections
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgcg.bench.chaos import journal
from pgcg.bench.cluster import Cluster, Proc
from pgcg.shared.queries import Queries
from tests.helpers import FAST_ENV, owners, pending, wait_for

pytestmark = pytest.mark.slow

GROUP = "orders-billing"
TOPIC = "orders"
HANDLER = "pgcg.bench.chaos.journal:record"
JOURNAL = Queries("journal")
ENV = {
    **FAST_ENV,
    "PGCG_RETRY_BASE": "0.05",
    "PGCG_RETRY_MAX": "0.5",
    journal.WORK_ENV: "2",
}


def load(db: psycopg.Connection[Any], cluster: Cluster) -> dict[str, int]:
    """Partitions per live member id, for assigned rows only."""
    return dict(
        collections.Counter(m for m, _, state in owners(db, GROUP).values() if state == "assigned")
    )


def balanced(db: psycopg.Connection[Any], cluster: Cluster, procs: list[Proc]) -> bool:
    members = {cluster.member_id(p) for p in procs}
    if None in members:
        return False
    per_member = load(db, cluster)
    quota = 16 // len(procs)
    return (
        set(per_member) == members
        and sum(per_member.values()) == 16
        and all(quota <= n <= quota + 1 for n in per_member.values())
    )


def test_group_protocol_under_failures(
    db: psycopg.Connection[Any], dsn: str, tmp_path: Path
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 16)", (TOPIC,))
    journal.create(db)
    producer = journal.Producer(dsn, TOPIC, keys=64, rate=400)
    faults: list[journal.Disruption] = []
    with Cluster(dsn, tmp_path, env=ENV) as cluster:
        coord_a = cluster.coordinator(name="coord-a")
        coord_b = cluster.coordinator(name="coord-b")
        c1, c2, c3 = (cluster.consumer(GROUP, TOPIC, HANDLER, name=f"c{i}") for i in (1, 2, 3))
        producer.start()

        wait_for(lambda: balanced(db, cluster, [c1, c2, c3]), 30, "6/5/5 over three consumers")

        # SIGKILL a consumer: its partitions resume elsewhere once its session expires.
        faults.append(journal.Disruption("consumer-kill", _now(), None, c1.pid))
        c1.kill()
        wait_for(lambda: balanced(db, cluster, [c2, c3]), 20, "8/8 after SIGKILL of c1")

        # A new consumer gets its share.
        c4 = cluster.consumer(GROUP, TOPIC, HANDLER, name="c4")
        wait_for(lambda: balanced(db, cluster, [c2, c3, c4]), 20, "c4 gets its share")

        # SIGSTOP a consumer past its session timeout: its partitions move; after SIGCONT
        # its acks are rejected and it rejoins under a new member id.
        old_c2 = cluster.member_id(c2)
        c2_paused = _now()
        c2.pause()
        wait_for(lambda: balanced(db, cluster, [c3, c4]), 20, "8/8 while c2 is paused")
        c2.resume()
        faults.append(journal.Disruption("consumer-pause", c2_paused, _now(), c2.pid))
        wait_for(
            lambda: cluster.member_id(c2) not in (None, old_c2), 20, "c2 rejoins as a new member"
        )
        wait_for(lambda: balanced(db, cluster, [c2, c3, c4]), 20, "c2 gets a share again")
        c2_logs = {r.get("action") for r in c2.logs()}
        assert {"member_expelled", "member_joined"} <= c2_logs or "lease_expired" in c2_logs
        assert c2.actions("member_joined")[-1].get("rejoin") is True

        # SIGKILL the leader: the standby leads.
        leader, epoch = wait_for(lambda: _leader(cluster), 10, "a leader")
        standby = coord_b if leader is coord_a else coord_a
        faults.append(journal.Disruption("leader-kill", _now(), None, leader.pid))
        leader.kill()
        wait_for(lambda: _leader(cluster, newer_than=epoch, proc=standby), 15, "standby leads")

        # SIGSTOP the leader: a standby deposes it; after SIGCONT the old leader writes
        # nothing (its session is gone and its epoch is stale).
        coord_c = cluster.coordinator(name="coord-c")
        wait_for(lambda: coord_c.actions("standby"), 15, "coord-c standing by")
        paused_leader, paused_epoch = _leader(cluster) or (None, 0)  # type: ignore[misc]
        assert paused_leader is standby
        leader_paused = _now()
        paused_leader.pause()
        new_leader = wait_for(
            lambda: _leader(cluster, newer_than=paused_epoch, proc=coord_c), 20, "coord-c leads"
        )
        # Churn while the old leader sleeps, so a zombie leader would have work to do.
        c5 = cluster.consumer(GROUP, TOPIC, HANDLER, name="c5")
        wait_for(lambda: balanced(db, cluster, [c2, c3, c4, c5]), 20, "c5 gets its share")
        paused_leader.resume()
        faults.append(journal.Disruption("leader-pause", leader_paused, _now(), paused_leader.pid))
        wait_for(
            lambda: paused_leader.actions("leader_lost") or paused_leader.actions("leader_deposed"),
            15,
            "the old leader notices it lost leadership",
        )
        assert new_leader
        rebalances = db.execute(
            "SELECT generation, leader_epoch FROM pgcg.rebalances WHERE group_name = %s "
            "ORDER BY generation",
            (GROUP,),
        ).fetchall()
        after_takeover = [r for r in rebalances if r["leader_epoch"] > paused_epoch]
        first_new = min(r["generation"] for r in after_takeover)
        assert all(
            r["leader_epoch"] > paused_epoch for r in rebalances if r["generation"] > first_new
        ), "a deposed leader recorded a rebalance"

        producer.stop()
        assert producer.produced > 500
        try:
            # Generous: on a loaded 2-core host the journal handler's own writes compete
            # with a dozen processes; the failure message says where messages are stuck.
            wait_for(lambda: _drained(db), 180, "the queue drained")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_where_pending(db)}") from None
        # The faults go to the checker, which tells their expected traces (a duplicate
        # after a SIGKILL, a start stamped just after SIGCONT) from violations.
        verdict = journal.check(db, TOPIC, disruptions=faults)
        assert verdict.ok, verdict.summary() + "\n" + "\n".join(verdict.examples())
        assert verdict.handled == verdict.produced


def _leader(
    cluster: Cluster, *, newer_than: int = -1, proc: Proc | None = None
) -> tuple[Proc, int] | None:
    leader, epoch = cluster.leader(GROUP)
    if leader is None or epoch <= newer_than or (proc is not None and leader is not proc):
        return None
    return leader, epoch


def _drained(db: psycopg.Connection[Any]) -> bool:
    db.row_factory = dict_row  # type: ignore[assignment]
    return pending(db, TOPIC) == 0


def _now() -> datetime:
    return datetime.now(UTC)


def _where_pending(db: psycopg.Connection[Any]) -> str:
    rows = db.execute(JOURNAL.pending_by_partition, {"topic": TOPIC}).fetchall()
    return "pending per partition: " + "; ".join(str(dict(r)) for r in rows)
