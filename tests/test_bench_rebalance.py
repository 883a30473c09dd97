"""`pgcg bench rebalance`: the in-process rebalance cost, clean-up, and the report's
arithmetic. The process scenarios are exercised by running the benchmark itself."""

from __future__ import annotations

import math
from typing import Any

import psycopg
from click.testing import CliRunner

from pgcg.bench import rebalance_cost
from pgcg.bench.rebalance import cleanup, rebalance, summarize


def test_rebalance_cost_counts_statements_and_moves(db: psycopg.Connection[Any], dsn: str) -> None:
    samples, group, topic = rebalance_cost.measure(
        dsn, run_id="t1", members=5, partitions=12, repeat=2
    )
    assert [len(samples[k]) for k in rebalance_cost.KINDS] == [2, 2, 2, 2]
    for s in samples["initial"]:
        assert (s["moves"], s["statements"], s["recorded"]) == (12, 9, True)
    for s in samples["noop"]:
        # bound_lock_waits, lock_leadership, member_heartbeats, live_members,
        # assignments_for_update; no row.
        assert (s["moves"], s["statements"], s["recorded"]) == (0, 5, False)
    for s in samples["leave"]:
        assert s["recorded"] and s["moves"] in (2, 3)  # the leaver's partitions, forced
    for s in samples["join"]:
        assert s["recorded"] and s["moves"] == 2  # 12 over 5 members: the newcomer's share
    cleanup(dsn, group, topic)
    left = db.execute(
        "SELECT (SELECT count(*) FROM pgcg.topics WHERE name = %(t)s) AS topics, "
        "(SELECT count(*) FROM pgcg.partition_assignments WHERE group_name = %(g)s) AS rows, "
        "(SELECT count(*) FROM pgcg.groups WHERE group_name = %(g)s) AS groups, "
        "to_regclass(%(log)s) AS log, to_regclass(%(seq)s) AS seq",
        {"t": topic, "g": group, "log": f"pgcg.log_{topic}", "seq": f"pgcg.log_{topic}_p0"},
    ).fetchone()
    assert left == {"topics": 0, "rows": 0, "groups": 0, "log": None, "seq": None}


def test_summarize_takes_numbers_of_completed_repeats() -> None:
    samples = [
        {"a_s": 1.0, "n": 4, "ok": True, "per_partition": [[0, 1.0]]},
        {"a_s": 3.0, "n": 4, "ok": False, "per_partition": []},
        {"a_s": 2.0, "n": 4, "ok": True, "nan_s": math.nan},
        {"error": "timed out"},
    ]
    out = summarize(samples)
    assert out["a_s"] == {"median": 2.0, "max": 3.0, "min": 1.0, "n": 3}
    assert set(out) == {"a_s", "n"}


def test_command_help() -> None:
    result = CliRunner().invoke(rebalance, ["--help"])
    assert result.exit_code == 0
    assert "--session-timeout" in result.output and "--repeat" in result.output
