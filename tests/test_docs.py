"""docs/api.md stays true: its Python examples run, in order, against a real database, and
it documents every name the package root exports."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import pgcg

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", API, re.S | re.M)


def test_the_examples_run(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(BLOCKS) >= 6
    monkeypatch.setenv("PGCG_DATABASE_URL", dsn)
    # One module for the whole page, as a reader would paste it into one file.
    module = types.ModuleType("pgcg_api_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for n, block in enumerate(BLOCKS, start=1):
        code = compile(block, f"docs/api.md (python block {n})", "exec")
        exec(code, module.__dict__)


def test_every_public_name_is_documented() -> None:
    missing = [name for name in pgcg.__all__ if not name.startswith("_") and name not in API]
    assert missing == []
