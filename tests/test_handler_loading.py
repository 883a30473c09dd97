"""`--handler` imports from the installed packages and the folders named with
--handler-path / PGCG_HANDLER_PATH, never silently from the current directory; a handler
module that fails on import is one line and exit 2, whatever it raised."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgcg.shared.cli import main

PGCG = str(Path(sys.executable).with_name("pgcg"))  # the console script, as users run it


def _module(folder: Path, body: str) -> str:
    name = f"h_{uuid.uuid4().hex[:10]}"  # fresh each time: nothing cached in sys.modules
    (folder / f"{name}.py").write_text(body)
    return name


def _consumer(handler: str, *args: str, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["consumer", "--group", "g", "--topic", "t", "--handler", handler, *args], env=env
    )
    return result.exit_code, result.output


def test_the_current_directory_is_only_searched_when_asked(tmp_path: Path) -> None:
    name = _module(tmp_path, "open('imported', 'w').close()\nraise RuntimeError('from cwd')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGCG_HANDLER_PATH")}
    run = [PGCG, "consumer", "--group", "g", "--topic", "t", "--handler", f"{name}:handle"]
    plain = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert plain.returncode == 2, plain.stderr
    assert f"cannot import handler module {name!r}" in plain.stderr
    assert "--handler-path" in plain.stderr
    assert not (tmp_path / "imported").exists()  # the module never ran
    asked = subprocess.run([*run, "--handler-path", "."], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert asked.returncode == 2 and "raised RuntimeError on import: from cwd" in asked.stderr
    assert (tmp_path / "imported").exists()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("raise ValueError('bad config')\n", "raised ValueError on import: bad config"),
        ("def handle(:\n", "raised SyntaxError on import"),
        ("import sys\nsys.exit(3)\n", "raised SystemExit on import: 3"),
        ("raise KeyError\n", "raised KeyError on import"),
        ("import no_such_dependency_xyz\n", "No module named 'no_such_dependency_xyz'"),
    ],
)
def test_a_module_failing_on_import_is_one_line_exit_2(
    tmp_path: Path, body: str, needle: str
) -> None:
    name = _module(tmp_path, body)
    code, output = _consumer(f"{name}:handle", "--handler-path", str(tmp_path))
    assert code == 2, output
    assert needle in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1


def test_handler_path_from_the_environment_and_flag(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    name = _module(second, "raise RuntimeError('found in b')\n")
    code, output = _consumer(
        f"{name}:handle", PGCG_HANDLER_PATH=os.pathsep.join([str(first), str(second)])
    )
    assert code == 2 and "found in b" in output, output
    missing = _consumer(f"{name}:handle", "--handler-path", str(tmp_path / "nope"))
    assert missing[0] == 2 and "is not a directory" in missing[1]
