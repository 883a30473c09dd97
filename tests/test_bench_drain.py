"""`pgcg bench drain --tracing`: the traced drains really trace (every process span reaches
the bench's OTLP sink at 100 %, about the ratio's share at 1 %), the messages carry
their own trace context, and bad modes are refused. Timings are the benchmark's to
report, not a test's to assert."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgcg.bench.cli import _text, drain
from pgcg.bench.drain import (
    DrainOptions,
    _cross_ratios,
    make_workload,
    parse_list,
    parse_tracing,
    run_drain,
)


def test_traced_drains_export_their_process_spans(
    db: psycopg.Connection[Any], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stray OTEL_* in the shell must not send the consumers' spans elsewhere.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9")
    opts = DrainOptions(
        messages=400, keys=20, consumers=2, partitions=4, handlers=["noop"], raw=False,
        loop=False, database_url=dsn, tracing=[None, 1.0, 0.25], timeout=120,
    )  # fmt: skip
    result = run_drain(opts)
    runs = result["pgcg"]
    assert set(runs) == {"noop", "noop+tracing-100%", "noop+tracing-25%"}
    for run in runs.values():
        assert run["drain"]["handled"] >= 400
        assert run["drain"]["key_order_violations"] == 0
    assert "spans_exported" not in runs["noop"]["drain"]
    for run in runs.values():
        # Metrics on in every drain of a traced run, off included: the ratios are tracing's.
        metrics = run["drain"]["metrics_exported"]
        assert metrics["processed"] == metrics["process_durations"] == 400
    every = runs["noop+tracing-100%"]["drain"]["spans_exported"]
    assert every["process"] >= every["sampled_messages"] == 400
    sampled = sum(
        1 for m in make_workload(opts, 0.25) if m.headers["traceparent"].endswith("-03")
    )  # the producers' choice, which the consumers' parent-based sampler follows
    assert 50 < sampled < 150
    share = runs["noop+tracing-25%"]["drain"]["spans_exported"]
    assert share["process"] == share["sampled_messages"] == sampled
    assert set(result["ratios"]) == {
        "drain_noop_tracing_100%_vs_off",
        "consumer_cpu_per_msg_noop_tracing_100%_vs_off",
        "drain_noop_tracing_25%_vs_off",
        "consumer_cpu_per_msg_noop_tracing_25%_vs_off",
    }
    topics = db.execute("SELECT count(*) AS n FROM pgcg.topics WHERE name LIKE 'bench_%'")
    assert topics.fetchone() == {"n": 0}, "the bench cleans up its topics"


def test_the_parked_drain_drains_every_key_through_the_parked_queue(dsn: str) -> None:
    opts = DrainOptions(
        messages=100, keys=4, consumers=1, partitions=2, handlers=["parked"], raw=False,
        loop=False, database_url=dsn, timeout=120,
    )  # fmt: skip
    drained = run_drain(opts)["pgcg"]["parked"]["drain"]
    # The failed first deliveries are not counted as handled: each message once, in order.
    assert drained["handled"] == 100
    assert drained["key_order_violations"] == drained["duplicates"] == 0


def test_repeated_modes_report_the_median_and_spread(dsn: str) -> None:
    opts = DrainOptions(
        messages=100, keys=10, consumers=1, partitions=2, handlers=["noop"], raw=False,
        loop=False, database_url=dsn, tracing=[None, 1.0], repeat=3, timeout=120,
    )  # fmt: skip
    result = run_drain(opts)
    assert [list(r) for r in result["rounds"]] == [["noop", "noop+tracing-100%"]] * 3
    assert result["pgcg"] == result["rounds"][0]
    # The modes took turns: off, 100 %, off, 100 % ...
    starts = [run["drain"]["started_at"] for r in result["rounds"] for run in r.values()]
    assert starts == sorted(starts)
    for round_ in result["rounds"]:
        for run in round_.values():
            assert run["drain"]["handled"] == 100
            assert run["drain"]["metrics_exported"]["processed"] == 100
    spread = result["tracing_spread"]
    assert set(spread) == {
        "drain_noop_tracing_100%_vs_off",
        "consumer_cpu_per_msg_noop_tracing_100%_vs_off",
    }
    for name, s in spread.items():
        assert len(s["rounds"]) == 3
        assert s["min"] <= s["median"] == result["ratios"][name] <= s["max"]
    assert "(median of 3 rounds," in _text(result)


def _run(server: str, messages: int, msgs_per_s: int, per_cpu_s: int | None) -> dict[str, Any]:
    drain = {"msgs_per_s": msgs_per_s, "cpu": {"msgs_per_cpu_s": per_cpu_s}}
    return {"label": {"server": server, "messages": messages},
            "pgcg": {"noop": {"tracing": "off", "drain": drain},
                     "noop+tracing-1%": {"tracing": "1%", "drain": drain}}}  # fmt: skip


def test_sizes_and_servers_compare_in_pairs() -> None:
    ratios = _cross_ratios([
        _run("pg15", 20_000, 1000, 500), _run("pg15", 1_000_000, 1500, 600),
        _run("pg18", 20_000, 2000, None), _run("pg18", 1_000_000, 2000, 400),
    ])  # fmt: skip
    assert ratios == {
        "drain_noop_pg15_1000000_vs_20000": 1.5,
        "drain_noop_pg15_per_cpu_s_1000000_vs_20000": 1.2,
        "drain_noop_pg18_1000000_vs_20000": 1.0,
        "drain_noop_20000_pg15_vs_pg18": 0.5,
        "drain_noop_1000000_pg15_vs_pg18": 0.75,
        "drain_noop_1000000_per_cpu_s_pg15_vs_pg18": 1.5,
    }
    one_server = _cross_ratios([_run("pg18", 20_000, 1000, 500), _run("pg18", 5_000, 500, 500)])
    assert one_server == {
        "drain_noop_20000_vs_5000": 2.0,
        "drain_noop_per_cpu_s_20000_vs_5000": 1.0,
    }
    assert parse_list(" 20000, 1000000 ,20000", "--messages") == ["20000", "1000000"]


def test_every_traced_message_starts_its_own_trace() -> None:
    messages = make_workload(DrainOptions(messages=1000, keys=10), 1.0)
    traces = {m.headers["traceparent"].split("-")[1] for m in messages}
    assert len(traces) == 1000
    assert all(m.headers["traceparent"].endswith("-03") for m in messages)
    assert all(not m.headers for m in make_workload(DrainOptions(messages=10, keys=10)))


def test_tracing_modes() -> None:
    assert parse_tracing("off") == [None]
    assert parse_tracing("off, on, 1%, 0.01, 0.5") == [None, 1.0, 0.01, 0.5]
    for bad in ("sometimes", "0", "1.5", "-1%", ""):
        with pytest.raises(ValueError, match="--tracing"):
            parse_tracing(bad)
    result = CliRunner().invoke(drain, ["--tracing", "often", "--messages", "10"])
    assert result.exit_code == 2
    assert "--tracing" in result.output and "a ratio in (0, 1]" in result.output
