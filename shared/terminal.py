"""Text from the database made safe to print on a terminal.

Keys, headers, member ids, error texts and progress notes are written by whoever can
produce or consume; printed raw, `\\x1b]0;pwned\\x07` retitles the operator's terminal and
other escape sequences can rewrite what `pgcg status` or `pgcg dlq list` appear to say.
Every string from the database goes through `printable` before the CLI prints it.
"""

from __future__ import annotations

from typing import Any


def _escape(code: int) -> str:
    named = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
    if code in named:
        return named[code]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# C0 and C1 controls and DEL (terminal escapes, bells, carriage returns that overwrite a
# line), and the invisible format characters that reorder or hide text (bidi overrides
# and isolates, zero-width characters, line and paragraph separators).
_UNSAFE = [
    *range(0x00, 0x20), 0x7F, *range(0x80, 0xA0),
    0x061C, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2028, 0x2029,
    *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF,
]  # fmt: skip
_TABLE = {code: _escape(code) for code in _UNSAFE}
_TABLE_KEEPING_NEWLINES = {code: text for code, text in _TABLE.items() if code != 0x0A}


def printable(value: object, *, keep_newlines: bool = False) -> str:
    """`value` as text with every control and invisible format character escaped
    (`\\x1b`, `\\u202e`), so it prints as what it is. Newlines too, unless kept (a
    traceback), so one value stays on one line."""
    text = value if isinstance(value, str) else str(value)
    return text.translate(_TABLE_KEEPING_NEWLINES if keep_newlines else _TABLE)


def printable_values(value: Any) -> Any:
    """`value` (dicts, lists, scalars) with `printable` applied to every string in it."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: printable_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_values(v) for v in value]
    return value
