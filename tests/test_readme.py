"""The README stays true: every setting documented, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from pgcg.shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_table() -> None:
    for name, field in Settings.model_fields.items():
        row = next(
            (line for line in README.splitlines() if line.startswith(f"| `PGCG_{name.upper()}`")),
            None,
        )
        assert row is not None, f"PGCG_{name.upper()} missing from the README settings table"
        assert f"`--{name.replace('_', '-')}`" in row
        default = "none" if field.default is None else str(field.default)
        assert f"| {default} |" in row, f"README default for {name} is not {default}"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert "pytest" in commands, "the README gives `pytest` as the test command"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "pytest"
