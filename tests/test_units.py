"""Durations and sizes as operators type them: one grammar, and what is printed reads back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcg.shared.errors import InvalidInput
from pgcg.shared.units import (
    MAX_DURATION_MS,
    MAX_SIZE,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "ms"),
    [("30", 30_000), ("1.5", 1500), ("250ms", 250), ("30s", 30_000), ("30m", 1_800_000),
     ("12h", 43_200_000), ("7d", 604_800_000), ("2w", 1_209_600_000), (" 7D ", 604_800_000),
     ("1.5h", 5_400_000), ("0", 0), (".5s", 500)],
)  # fmt: skip
def test_durations(text: str, ms: int) -> None:
    assert parse_duration(text, "--retention") == ms


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("1kB", 1024), ("10MB", 10 << 20), ("1gb", 1 << 30), ("2TB", 2 << 40),
     ("1GiB", 1 << 30), ("1.5GB", 3 << 29), ("7B", 7), ("0", 0)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text, "--retention-bytes") == size


@pytest.mark.parametrize(
    "text", ["", "abc", "-1d", "7 days", "1d2h", "nan", "inf", "1e3", "0.0001ms", "101y",
             "99999999999999d"],
)  # fmt: skip
def test_bad_durations_name_the_flag(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"^--retention "):
        parse_duration(text, "--retention")


@pytest.mark.parametrize("text", ["", "10 parsecs", "-5MB", "1.5B", "1PB", "99999999TB"])
def test_bad_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"^--segment-bytes "):
        parse_size(text, "--segment-bytes")


@given(st.integers(min_value=0, max_value=MAX_DURATION_MS))
def test_a_printed_duration_reads_back(ms: int) -> None:
    assert parse_duration(format_duration(ms), "--x") == ms


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_a_printed_size_reads_back(size: int) -> None:
    assert parse_size(format_size(size), "--x") == size


def test_printed_forms() -> None:
    assert [format_duration(ms) for ms in (None, 0, 1500, 90_000, 86_400_000, 1_209_600_000)] == [
        "-", "0s", "1500ms", "90s", "1d", "14d",
    ]  # fmt: skip
    assert [format_size(b) for b in (None, 0, 1536, 1 << 30, 10)] == ["-", "0B", "1536B",
                                                                      "1GB", "10B"]  # fmt: skip
