"""A rolling update of a 4-consumer group, replayed with real processes the way the
Deployment controller runs it (bench/rollout.py), under the strategy the chart renders and
under Kubernetes' default 25 %/25 % with the readiness pgcg used to have. The figures are
reported (`pytest -s` prints them; docs/helm.md has a run's); the assertions are on what
the chart's defaults promise, never on time."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from pgcg.bench.rollout import FAST, KUBERNETES_DEFAULT, Report, Rollout, Strategy, chart_strategy
from tests.chart import consumers, container, render

pytestmark = pytest.mark.slow

REPLICAS = 4
PARTITIONS = 16


def rendered_strategy(helm: str) -> Strategy:
    """The rollout the chart renders for a group with the bench's settings."""
    sets = [f"settings.{k}={v}" for k, v in FAST.items()]
    deployment = consumers(render(helm, sets=(*sets, "groups.g.topic=o", "groups.g.handler=m:f")))
    spec = deployment["g"]["spec"]
    rolling = spec["strategy"]["rollingUpdate"]
    probe = container(deployment["g"])["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    return Strategy(
        "chart",
        rolling["maxSurge"],
        rolling["maxUnavailable"],
        spec["minReadySeconds"],
        "holds",
        probe["periodSeconds"],
        probe["failureThreshold"],
    )


def test_the_replay_uses_what_the_chart_renders(helm):
    assert rendered_strategy(helm) == chart_strategy(FAST["sessionTimeout"])


def test_the_default_rolling_update_resolves_like_the_controller():
    assert KUBERNETES_DEFAULT.resolve(4) == (1, 1)
    assert KUBERNETES_DEFAULT.resolve(3) == (1, 0)
    assert KUBERNETES_DEFAULT.resolve(2) == (1, 0)
    assert Strategy("x", 0, 0, 0, "holds").resolve(4) == (0, 1)


def test_a_rolling_update_under_the_chart_defaults_replaces_one_consumer_at_a_time(
    helm: str, dsn: str, tmp_path: Path, record_property: Any
) -> None:
    chart = Rollout(dsn, tmp_path / "chart", rendered_strategy(helm), run_id="chart").run()
    default = Rollout(dsn, tmp_path / "default", KUBERNETES_DEFAULT, run_id="default").run()
    for report in (chart, default):
        record_property(report.strategy, json.dumps(asdict(report)))
        print(_line(report))

    assert chart.stops == default.stops == REPLICAS
    # Every old consumer was stopped only once each available new one held its share.
    assert chart.short_at_stop == [0] * REPLICAS
    # While an old consumer drained, every other partition had a working owner: no
    # hand-off to a new consumer overlapped it.
    assert chart.beyond_draining == 0
    # So at no moment were more partitions without a working owner than one consumer holds.
    assert chart.max_unowned <= math.ceil(PARTITIONS / REPLICAS)


def _line(report: Report) -> str:
    return (
        f"{report.strategy:>8}: {report.duration_s:5.1f} s, {report.moves} moves, "
        f"{report.rebalances} rebalances, longest without an owner {report.max_unowned_s} s, "
        f"at most {report.max_unowned} at once ({report.beyond_draining} beyond the draining "
        f"pod's), new pods short of their share at each stop {report.short_at_stop}, "
        f"{report.forced} forced, {report.lost} lost"
    )
