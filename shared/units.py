"""Durations and sizes as operators type them (`7d`, `12h`, `512MB`), and back.

One grammar for every flag that takes one: a number, optionally with a fraction, then
optionally one unit. A duration without a unit is seconds; units are ms, s, m, h, d, w.
A size without a unit is bytes; units are kB, MB, GB, TB (1024-based, as PostgreSQL's own
settings read them; KiB, MiB, GiB, TiB are the same), case-insensitive. Formatting picks
the largest unit that divides the value exactly, so what `pgcg topic list` prints can be
typed back.
"""

from __future__ import annotations

import re
from decimal import Decimal

from pgcg.shared.errors import InvalidInput

_NUMBER = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"
_DURATION = re.compile(_NUMBER + r"(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_SIZE = re.compile(_NUMBER + r"(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*", re.IGNORECASE)

DURATION_UNITS_MS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000,
                     "s": 1000, "ms": 1}  # fmt: skip
SIZE_UNITS = {"TB": 1 << 40, "GB": 1 << 30, "MB": 1 << 20, "kB": 1 << 10, "B": 1}
_SIZE_ALIASES = {"tib": "TB", "gib": "GB", "mib": "MB", "kib": "kB"}

# Far beyond any sensible retention, far inside a bigint of milliseconds or bytes.
MAX_DURATION_MS = 100 * 365 * DURATION_UNITS_MS["d"]
MAX_SIZE = 1 << 60

DURATION_HELP = "seconds, or with a unit: 250ms, 30s, 30m, 12h, 7d, 2w"
SIZE_HELP = "bytes, or with a unit: kB, MB, GB, TB (1024-based)"


def parse_duration(text: str, flag: str) -> int:
    """Milliseconds for `text`; InvalidInput naming `flag` if it is not a duration."""
    match = _DURATION.fullmatch(text or "")
    if not match:
        raise InvalidInput(f"{flag} {text!r} is not a duration: use {DURATION_HELP}")
    number, unit = match.groups()
    # Decimal: exact for every value a bigint holds (a float is not past 2**53).
    ms = Decimal(number) * DURATION_UNITS_MS[(unit or "s").lower()]
    if ms > MAX_DURATION_MS:
        raise InvalidInput(f"{flag} {text!r} is too long: at most 100 years")
    if ms != int(ms):
        raise InvalidInput(f"{flag} {text!r} is not a whole number of milliseconds")
    return int(ms)


def parse_size(text: str, flag: str) -> int:
    """Bytes for `text`; InvalidInput naming `flag` if it is not a size."""
    match = _SIZE.fullmatch(text or "")
    if not match:
        raise InvalidInput(f"{flag} {text!r} is not a size: use {SIZE_HELP}")
    number, unit = match.groups()
    canonical = _canonical_size_unit(unit or "B")
    value = Decimal(number) * SIZE_UNITS[canonical]
    if value > MAX_SIZE:
        raise InvalidInput(f"{flag} {text!r} is too large: at most 1048576TB")
    if value != int(value):
        raise InvalidInput(f"{flag} {text!r} is not a whole number of bytes")
    return int(value)


def _canonical_size_unit(unit: str) -> str:
    lowered = unit.lower()
    if lowered in _SIZE_ALIASES:
        return _SIZE_ALIASES[lowered]
    return next(u for u in SIZE_UNITS if u.lower() == lowered)


def format_duration(ms: int | None) -> str:
    """`7d`, `90m`, `1500ms`; `-` for none."""
    if ms is None:
        return "-"
    if ms == 0:
        return "0s"
    # Days at most: `14d` reads better than `2w`.
    return next(f"{ms // n}{u}" for u, n in DURATION_UNITS_MS.items() if u != "w" and ms % n == 0)


def format_size(size: int | None) -> str:
    """`1GB`, `1536kB`, `10B`; `-` for none."""
    if size is None:
        return "-"
    if size == 0:
        return "0B"
    return next(f"{size // n}{u}" for u, n in SIZE_UNITS.items() if size % n == 0)


def approx_size(size: int | None) -> str:
    """A size for people to read at a glance (status): `1.4 GB`, `820 kB`."""
    if size is None:
        return "-"
    for unit, n in SIZE_UNITS.items():
        if size >= n and unit != "B":
            return f"{size / n:.1f} {unit}"
    return f"{size} B"
