"""`pgcg chaos` end to end: a short schedule with every fault kind must pass its checker,
and the same checker must fail when the consumers run without fencing.

These are CI's chaos runs (about three minutes together); long runs are for humans:
`pgcg chaos --messages 100000`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pgcg.bench.chaos.nemesis import FAULT_KINDS, schedule

SAFE_SEED = 7
# Seeds whose first 40 s hold the most hand-off variants (6 of 8 or 9 faults), each a
# chance for a held ack to land after its partition moved on.
UNSAFE_SEEDS = (61, 74, 72)


def chaos(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pgcg.shared.cli", "chaos", "--report-json", str(report), *args],
        capture_output=True,
        text=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert report.exists(), output
    return result.returncode, json.loads(report.read_text()), output


def test_the_schedule_follows_its_seed() -> None:
    def first(seed: int, n: int) -> list[Any]:
        return list(
            itertools.islice(schedule(seed, FAULT_KINDS, session_timeout=3, leader_timeout=3), n)
        )

    assert first(5, 30) == first(5, 30)
    assert first(5, 30) != first(6, 30)
    # Every round is a permutation of the kinds: a run of one round has seen them all.
    for n in range(3):
        chunk = first(5, 30)[n * len(FAULT_KINDS) : (n + 1) * len(FAULT_KINDS)]
        assert sorted(f.kind for f in chunk) == sorted(FAULT_KINDS)
    with pytest.raises(ValueError, match="unknown fault"):
        next(schedule(1, ["meteor-strike"], session_timeout=3, leader_timeout=3))


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_a_short_schedule_of_every_fault_passes(tmp_path: Path) -> None:
    code, report, output = chaos(
        tmp_path, "--seed", str(SAFE_SEED), "--duration", "60", "--rate", "100"
    )
    assert code == 0 and report["ok"], output
    assert set(report["fault_counts"]) == set(FAULT_KINDS), report["fault_counts"]
    verdict = report["verdict"]
    # Two groups read the topic by default: each handled every message.
    assert set(verdict["groups"]) == {"chaos", "chaos-audit"}, verdict["groups"]
    assert verdict["produced"] > 3000 and verdict["handled"] == verdict["produced"]
    for group in verdict["groups"].values():
        assert group["handled"] == verdict["produced"] and not any(group["violations"].values())
    assert not any(verdict["violations"].values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_without_fencing_the_checker_fails(tmp_path: Path) -> None:
    """Results without the epoch fence (the run's ownership check lets every write
    through): a consumer cut off past its session and let back the moment its partitions
    moved on gets its held results accepted after the hand-off, which the checker must
    report."""
    # Whether a held ack lands after the hand-off depends on timing: the fault must heal
    # inside a window of a few milliseconds. One schedule catches it most of the time;
    # three in a row miss it rarely enough for CI (seeds 3 and 4, with one or two
    # hand-offs each, both missed in a CI run).
    for seed in UNSAFE_SEEDS:
        code, report, output = chaos(
            tmp_path / f"seed-{seed}", "--seed", str(seed), "--duration", "40", "--rate",
            "150", "--work-ms", "20", "--faults", "net-stall,consumer-pause",
            "--unsafe-no-fencing",
        )  # fmt: skip
        if code == 1:
            break
    assert code == 1, output
    assert report["verdict"]["violations"]["stale_acks"] > 0, output
    assert "stale ack: " in output and "verdict: FAILED" in output
