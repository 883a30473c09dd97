"""Every bench command runs end to end at a tiny size and reports what it promises, and
cleans up after itself. Structure only: speed is the benchmarks' to report, never a test's
to assert. CI runs these on PostgreSQL 15 as well."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgcg.bench import idle, latency, soak
from pgcg.bench.cli import _runs_text, _text, bench
from pgcg.bench.drain import DrainOptions, run_drain, run_drains
from pgcg.bench.throwaway import server_bin

pytestmark = pytest.mark.pg15

PERCENTILES = {"p50", "p90", "p99", "max", "count"}


def _leftovers(db: psycopg.Connection[Any]) -> dict[str, int]:
    row = db.execute(
        "SELECT (SELECT count(*) FROM pgcg.topics) AS topics, "
        "(SELECT count(*) FROM pgcg.groups) AS groups, "
        "(SELECT count(*) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        " WHERE n.nspname = 'pgcg' AND c.relname ~ '^(log_|ledger_)?bench') "
        "+ (SELECT count(*) FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace "
        " WHERE n.nspname = 'pgcg' AND p.proname LIKE 'read_bench%%') AS tables"
    ).fetchone()
    assert row is not None
    return dict(row)


def test_drain_reports_both_baselines(db: psycopg.Connection[Any], dsn: str) -> None:
    result = run_drain(
        DrainOptions(messages=300, keys=30, consumers=2, partitions=4, concurrency=8,
                     handlers=["noop"], database_url=dsn, timeout=120)
    )  # fmt: skip
    loop = result["loop"]["noop"]["drain"]
    assert loop["messages"] == loop["handled"] == 300
    assert loop["processes"] == 2 and loop["concurrency"] == 8
    assert {"seconds", "msgs_per_s", "key_order_violations", "cpu"} <= set(loop)
    assert result["pgcg"]["noop"]["drain"]["key_order_violations"] == 0
    assert result["raw"]["drain"]["messages"] == 300
    assert {"drain_noop_vs_loop_drain", "drain_noop_vs_raw_drain"} <= set(result["ratios"])
    assert "loop noop drain" in _text(result)
    assert _leftovers(db) == {"topics": 0, "groups": 0, "tables": 0}


def test_drain_reports_each_group_beside_one_group(db: psycopg.Connection[Any], dsn: str) -> None:
    result = run_drain(
        DrainOptions(messages=200, keys=20, consumers=1, partitions=2, concurrency=8, groups=2,
                     handlers=["noop"], raw=False, loop=False, database_url=dsn, timeout=120)
    )  # fmt: skip
    one = result["pgcg"]["noop"]["drain"]
    assert one["handled"] == 200 and "msgs_per_consumer_cpu_s" in one
    # Memory with the prefetch full is a figure users size pods by.
    assert all(mb > 0 for mb in one["cpu"]["consumers_peak_rss_mb"])
    assert "consumers' peak RSS" in _text(result)
    run = result["groups"]["noop"]
    assert run["groups"] == 2 and len(run["by_group"]) == 2
    for drained in run["by_group"].values():
        # every group handles every message, in key order
        assert drained["handled"] == 200 and drained["key_order_violations"] == 0
        assert drained["msgs_per_s"] > 0 and "msgs_per_consumer_cpu_s" in drained
    assert run["all"]["handled"] == 400
    assert {"drain_noop_2_groups_g0_vs_one_group", "drain_noop_2_groups_g1_vs_one_group"} <= set(
        result["ratios"]
    )
    assert "noop 2 groups, g1: drain" in _text(result)
    assert _leftovers(db) == {"topics": 0, "groups": 0, "tables": 0}


def test_drain_compares_backlog_sizes_on_one_server(db: psycopg.Connection[Any], dsn: str) -> None:
    opts = DrainOptions(keys=20, consumers=1, partitions=2, concurrency=8, handlers=["sleep1ms"],
                        raw=False, loop=False, database_url=dsn, timeout=120)  # fmt: skip
    result = run_drains(opts, [100, 300], [None])
    assert [r["label"]["messages"] for r in result["runs"]] == [100, 300]
    for run in result["runs"]:
        drain = run["pgcg"]["sleep1ms"]["drain"]
        assert drain["handled"] == run["label"]["messages"] == run["config"]["messages"]
        assert drain["key_order_violations"] == 0
        # A 1 ms handler against what --concurrency allows at most.
        assert run["ratios"]["drain_sleep1ms_vs_concurrency_bound"] > 0
    # The caller's server: no server CPU to count, so throughput alone.
    assert set(result["ratios"]) == {"drain_sleep1ms_300_vs_100"}
    assert "ratio drain_sleep1ms_300_vs_100" in _runs_text(result)
    assert _leftovers(db) == {"topics": 0, "groups": 0, "tables": 0}


def test_drain_compares_servers() -> None:
    try:
        server_bin("15")
    except FileNotFoundError:
        pytest.skip("Debian's postgresql-15 is not installed")
    opts = DrainOptions(keys=10, consumers=1, partitions=2, concurrency=8, handlers=["noop"],
                        raw=False, loop=False, timeout=120)  # fmt: skip
    result = run_drains(opts, [100], ["15", "18"])
    assert [r["label"]["server"] for r in result["runs"]] == ["pg15", "pg18"]
    assert [r["server"]["version"].split(".")[0] for r in result["runs"]] == ["15", "18"]
    assert all(r["pgcg"]["noop"]["drain"]["handled"] == 100 for r in result["runs"])
    # Throwaway servers: their CPU counts, so the per CPU-second ratio is there too.
    assert set(result["ratios"]) == {"drain_noop_pg15_vs_pg18", "drain_noop_per_cpu_s_pg15_vs_pg18"}


def test_soak_reports_intervals_and_a_verdict(db: psycopg.Connection[Any], dsn: str) -> None:
    printed: list[dict[str, Any]] = []
    result = soak.run_soak(
        soak.SoakOptions(rate=100, duration=3, interval=1, groups=2, consumers=1,
                         partitions=4, keys=20, concurrency=4, hold_snapshot=True,
                         settle=5, database_url=dsn),
        printed.append,
    )  # fmt: skip
    groups = result["topic_groups"]
    assert len(groups) == 2 and "retained-log storage" in result["note"]
    assert len(result["intervals"]) == len(printed) == 3
    for row in result["intervals"]:
        assert set(row["handled_per_s_by_group"]) == set(groups)
        assert set(row["latency_ms"]) == PERCENTILES
        assert {"table_bytes", "index_bytes", "live_tuples", "dead_tuples", "autovacuums",
                "autoanalyzes"} <= set(row["storage"])  # fmt: skip
        assert soak.render_interval(row).startswith(f"t={row['t_end_s']:>6g}s")
    totals = result["totals"]
    assert totals["enqueued"] > 0
    assert sum(totals["handled_by_group"].values()) >= totals["enqueued"]
    assert set(totals["latency_ms"]) == PERCENTILES
    verdict = result["verdict"]
    assert {"throughput_last_over_first", "storage_growth", "dead_tuples_at_end", "autovacuums",
            "latency_ms_first_tenth", "latency_ms_last_tenth"} <= set(verdict)  # fmt: skip
    assert "verdict: throughput last/first tenth" in soak.render(result)
    assert _leftovers(db) == {"topics": 0, "groups": 0, "tables": 0}


def test_latency_reports_notify_and_polling(db: psycopg.Connection[Any], dsn: str) -> None:
    result = latency.run_latency(
        latency.LatencyOptions(rates=[20], duration=2, partitions=2, database_url=dsn)
    )
    assert [(r["mode"], r["rate"]) for r in result["runs"]] == [("notify", 20), ("polling", 20)]
    for run in result["runs"]:
        assert set(run["latency_ms"]) == PERCENTILES
        assert run["latency_ms"]["count"] > 0
    assert "polling" in latency.render(result)
    assert _leftovers(db) == {"topics": 0, "groups": 0, "tables": 0}


def test_idle_reports_cpu_and_queries(db: psycopg.Connection[Any], dsn: str) -> None:
    result = idle.run_idle(
        idle.IdleOptions(consumers=1, partitions=2, duration=1.5, settle=0.5, database_url=dsn)
    )
    assert set(result["modes"]) == {"notify", "polling"}
    for mode in result["modes"].values():
        assert mode["queries_per_s_per_consumer"] >= 0
        assert mode["transactions_per_s_per_consumer"] is not None  # PostgreSQL >= 15
        assert len(mode["rss_mb_by_consumer"]) == 1
        assert mode["cpu"] is not None and mode["cpu_percent_per_consumer"] >= 0
        assert any(name.startswith("pgcg-member:") for name in mode["queries_per_s_by_application"])
    assert "queries/s sampled" in idle.render(result)
    assert _leftovers(db) == {"topics": 0, "groups": 0, "tables": 0}


def test_the_commands_are_wired(dsn: str) -> None:
    runner = CliRunner()
    for command in ("drain", "soak", "latency", "idle"):
        result = runner.invoke(bench, [command, "--help"])
        assert result.exit_code == 0 and "--server" in result.output, result.output
    soak_args = ["--rate", "50", "--duration", "1", "--interval", "1", "--partitions", "2"]
    result = runner.invoke(bench, ["soak", *soak_args, "--database-url", dsn, "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["intervals"]) == 1
    # One backlog size and no server list: the result as it has always been.
    drain_args = ["--messages", "50", "--keys", "5", "--consumers", "1", "--partitions", "2",
                  "--handler", "noop", "--no-raw", "--no-loop"]  # fmt: skip
    result = runner.invoke(bench, ["drain", *drain_args, "--database-url", dsn, "--json"])
    assert result.exit_code == 0, result.output
    single = json.loads(result.output)
    assert single["config"]["messages"] == 50 and "runs" not in single
    assert single["pgcg"]["noop"]["drain"]["handled"] == 50
    for bad in ("--messages", "20000,lots"), ("--messages", "20000,,5"), ("--server", "15,"):
        result = runner.invoke(bench, ["drain", *bad])
        assert result.exit_code == 2 and bad[0] in result.output, result.output
    result = runner.invoke(bench, ["drain", "--server", "15,18", "--database-url", dsn])
    assert result.exit_code == 1 and "drop --database-url" in result.output
    result = runner.invoke(bench, ["idle", "--server", "/nowhere", "--duration", "1"])
    assert result.exit_code == 1
    assert "no PostgreSQL server binaries in /nowhere" in result.output
