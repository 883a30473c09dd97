"""Rendering helm/pgcg with a real helm binary, and picking the rendered objects apart.

helm comes from `.ci/install-tools` (into .tools/bin) or PATH. Without it the chart tests
skip locally and fail under CI, which must not pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:  # the helm fixture skips (or fails under CI) then
    yaml = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "pgcg"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))

Doc = dict[str, Any]


def missing_tool(what: str) -> None:
    message = f"{what} not found: run .ci/install-tools (and pip install -e '.[test]')"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run the Helm chart tests, not skip them", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def helm() -> str:
    if yaml is None:
        missing_tool("pyyaml")
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("helm")
    if found is None:
        missing_tool("helm")
    return found  # type: ignore[return-value]


@cache
def run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def value_args(values: tuple[Path | str, ...], sets: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return args


def template_text(
    helm: str, *values: Path | str, sets: tuple[str, ...] = (), chart: Path = CHART
) -> str:
    result = run(helm, "template", "t", str(chart), *value_args(values, sets))
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(
    helm: str, *values: Path | str, sets: tuple[str, ...] = (), chart: Path = CHART
) -> list[Doc]:
    return [
        d for d in yaml.safe_load_all(template_text(helm, *values, sets=sets, chart=chart)) if d
    ]


def render_error(helm: str, *values: Path | str, sets: tuple[str, ...] = ()) -> str:
    result = run(helm, "template", "t", str(CHART), *value_args(values, sets))
    assert result.returncode != 0, f"expected the render to fail:\n{result.stdout[:2000]}"
    return result.stderr


def renders(helm: str, *values: Path | str, sets: tuple[str, ...] = ()) -> bool:
    return run(helm, "template", "t", str(CHART), *value_args(values, sets)).returncode == 0


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def kn(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} not rendered once: {[kn(d) for d in docs]}"
    return matches[0]


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]


def container(doc: Doc) -> Doc:
    """The pgcg container of a workload (sidecars aside): the first one."""
    return pod_spec(doc)["containers"][0]


def env_of(doc: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container(doc).get("env", [])}


def workloads(docs: list[Doc]) -> list[Doc]:
    return of_kind(docs, "Deployment") + of_kind(docs, "Job")


def consumers(docs: list[Doc]) -> dict[str, Doc]:
    """Consumer Deployments by their exact group name."""
    return {
        d["metadata"]["annotations"]["pgcg/group"]: d
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "consumer"
    }


def config_of(docs: list[Doc], workload: Doc) -> dict[str, str]:
    """The data of the ConfigMap a workload's pgcg container reads its settings from."""
    (name,) = [
        s["configMapRef"]["name"] for s in container(workload)["envFrom"] if "configMapRef" in s
    ]
    return named(docs, "ConfigMap", name)["data"]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def values_file(name: str) -> Path:
    path = CHART / "ci" / name
    assert path.is_file(), path
    return path


def write_values(tmp_path: Path, text: str, name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
