"""`pgcg bench drain --tracing`: the traced drains really trace (every process span reaches
the bench's OTLP sink at 100 %, about the ratio's share at 1 %), the messages carry
their own trace context, and bad modes are refused. Timings are the benchmark's to
report, not a test's to assert."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgcg.bench.cli import drain
from pgcg.bench.drain import DrainOptions, make_workload, parse_tracing, run_drain


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
