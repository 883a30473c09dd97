"""The Helm chart in helm/pgcg, rendered by a real helm binary.

No cluster and no database: `helm lint --strict`, `helm template` for the default
values and every ci/*-values.yaml, the rendered manifests checked against the
Kubernetes 1.30 schemas, and assertions on the rendered objects.

helm comes from `.ci/install-tools` (into .tools/bin) or PATH. Without it these
tests skip locally and fail under CI, which must not pass by skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("pyyaml is in the test extra: pip install -e '.[test]'", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "pgcg"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSION = "1.30.0"
# Custom resources the chart renders; kubernetes-validate has no schema for them.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
GROUP_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$"
TOPIC_RE = r"^[a-z][a-z0-9_]{0,39}$"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

Doc = dict[str, Any]


def _missing_tool(what: str) -> None:
    message = f"{what} not found: run .ci/install-tools (and pip install -e '.[test]')"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run the Helm chart tests, not skip them", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def helm() -> str:
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("helm")
    if found is None:
        _missing_tool("helm")
    return found


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _missing_tool("kubernetes-validate")
    return kubernetes_validate


# --- running helm --------------------------------------------------------------------------


@cache
def _run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def _value_args(values: tuple[Path | str, ...], sets: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return args


def template_text(helm: str, *values: Path | str, sets: tuple[str, ...] = ()) -> str:
    result = _run(helm, "template", "t", str(CHART), *_value_args(values, sets))
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(helm: str, *values: Path | str, sets: tuple[str, ...] = ()) -> list[Doc]:
    return [d for d in yaml.safe_load_all(template_text(helm, *values, sets=sets)) if d]


def render_error(helm: str, *values: Path | str, sets: tuple[str, ...] = ()) -> str:
    result = _run(helm, "template", "t", str(CHART), *_value_args(values, sets))
    assert result.returncode != 0, f"expected the render to fail:\n{result.stdout[:2000]}"
    return result.stderr


def notes(helm: str, *values: Path | str, sets: tuple[str, ...] = ()) -> str:
    result = _run(helm, "install", "t", str(CHART), "--dry-run=client", *_value_args(values, sets))
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


# --- picking objects apart ------------------------------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} not rendered once: {[kn(d) for d in docs]}"
    return matches[0]


def kn(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def container(doc: Doc) -> Doc:
    containers = pod_spec(doc)["containers"]
    assert len(containers) == 1
    return containers[0]


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


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def values_file(name: str) -> Path:
    path = CHART / "ci" / name
    assert path.is_file(), path
    return path


def write_values(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return path


# --- the lag query ----------------------------------------------------------------------------


def named_queries(sql: str) -> dict[str, str]:
    """Split .sql text at its `-- name: <name>` lines; each query runs to the next one."""
    queries: dict[str, str] = {}
    current: str | None = None
    for line in sql.splitlines():
        m = re.match(r"^--\s*name:\s*(\S+)\s*$", line)
        if m:
            current = m.group(1)
            queries[current] = ""
        elif current is not None:
            queries[current] += line + "\n"
    return queries


def strip_sql(sql: str) -> str:
    """Comment lines dropped, whitespace collapsed."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return " ".join(" ".join(lines).split())


def lag_query_from_status_sql() -> str:
    queries = named_queries((REPO / "sql" / "queries" / "status.sql").read_text())
    assert "group_lag_total" in queries, sorted(queries)
    return strip_sql(queries["group_lag_total"])


# === lint and schemas =========================================================================

ALL_VALUES = [None, *CI_VALUES]
VALUES_IDS = ["default", *(p.name for p in CI_VALUES)]


def test_ci_values_cover_each_optional_feature():
    names = {p.name for p in CI_VALUES}
    for feature in ("keda", "servicemonitor", "otlp", "embedded-coordinator", "existing-secret"):
        assert f"{feature}-values.yaml" in names


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = _run(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_rendered_manifests_match_kubernetes_schemas(helm, kubernetes_validate, values):
    docs = render(helm, *([values] if values else []))
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kn(doc)} ({values}): {e.message} at {list(e.path)}")


def test_kubernetes_validate_cli_accepts_a_render(helm, kubernetes_validate):
    """The exact command docs/helm.md gives, so the docs stay true."""
    beside_python = Path(sys.executable).parent / "kubernetes-validate"
    cli = str(beside_python) if beside_python.exists() else shutil.which("kubernetes-validate")
    if cli is None:
        _missing_tool("kubernetes-validate command")
    result = subprocess.run(
        [cli, "--strict", "-k", KUBERNETES_VERSION, "-"],
        input=template_text(helm, values_file("keda-values.yaml")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_names_and_labels_are_valid_and_standard(helm, values):
    docs = render(helm, *([values] if values else []))
    for doc in docs:
        meta = doc["metadata"]
        assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, kn(doc)
        labels = meta["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ):
            assert key in labels, f"{kn(doc)} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == "t"
        for value in labels.values():
            assert LABEL_VALUE.match(value) and len(value) <= 63, (kn(doc), value)
    for workload in of_kind(docs, "Deployment"):
        selector = workload["spec"]["selector"]["matchLabels"]
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), kn(workload)
        assert "helm.sh/chart" not in selector, "a selector must not change between chart versions"


def test_selectors_of_different_deployments_do_not_overlap(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    deployments = of_kind(docs, "Deployment")
    for a in deployments:
        for b in deployments:
            if a is not b:
                sel = a["spec"]["selector"]["matchLabels"]
                other = b["spec"]["template"]["metadata"]["labels"]
                assert not sel.items() <= other.items(), f"{kn(a)} would adopt pods of {kn(b)}"


# === workloads ================================================================================


def test_default_values_render_coordinators_migrations_and_no_consumers(helm):
    docs = render(helm)
    assert sorted(kn(d) for d in docs) == [
        "ConfigMap/t-pgcg",
        "Deployment/t-pgcg-coordinator",
        "Job/t-pgcg-migrations",
        "PodDisruptionBudget/t-pgcg-coordinator",
        "Secret/t-pgcg-database",
        "Secret/t-pgcg-migrations-database",
        "ServiceAccount/t-pgcg",
    ]
    coordinator = named(docs, "Deployment", "t-pgcg-coordinator")
    assert coordinator["spec"]["replicas"] == 2
    assert container(coordinator)["command"] == ["pgcg"]
    assert container(coordinator)["args"] == ["coordinator"]


def test_replica_counts_come_from_values(helm):
    docs = render(helm, values_file("groups-values.yaml"), sets=("coordinator.replicas=3",))
    assert named(docs, "Deployment", "t-pgcg-coordinator")["spec"]["replicas"] == 3
    by_group = consumers(docs)
    assert by_group["billing"]["spec"]["replicas"] == 3
    # replicas: 0 is a real value (a paused group), not "unset, use the default of 2".
    assert by_group["Audit.v2_"]["spec"]["replicas"] == 0
    default = render(helm, sets=("groups.plain.topic=orders", "groups.plain.handler=pkg.mod:fn"))
    assert consumers(default)["plain"]["spec"]["replicas"] == 2


def test_consumer_runs_its_group_topic_handler_and_concurrency(helm):
    by_group = consumers(render(helm, values_file("groups-values.yaml")))
    billing = container(by_group["billing"])
    assert billing["command"] == ["pgcg"]
    args = billing["args"]
    assert args[0] == "consumer"
    assert flag(args, "--group") == "billing"
    assert flag(args, "--topic") == "orders"
    assert flag(args, "--handler") == "billing.handlers:handle_order"
    assert flag(args, "--concurrency") == "20"
    assert "--embedded-coordinator" not in args
    audit = container(by_group["Audit.v2_"])
    assert flag(audit["args"], "--group") == "Audit.v2_"
    assert flag(audit["args"], "--concurrency") == "10"
    # Per-group image, resources and env; defaults elsewhere.
    assert audit["image"] == "registry.example.com/audit-consumer:2.1.0"
    assert billing["image"] == "pgcg:0.1.0"
    assert billing["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    assert env_of(by_group["billing"])["BILLING_MODE"]["value"] == "live"
    assert "BILLING_MODE" not in env_of(by_group["Audit.v2_"])


def test_group_names_that_are_not_dns_names_get_safe_object_names(helm):
    by_group = consumers(render(helm, values_file("groups-values.yaml")))
    audit = by_group["Audit.v2_"]
    assert audit["metadata"]["name"] == "t-pgcg-consumer-audit-v2"
    assert audit["metadata"]["labels"]["pgcg/group"] == "Audit.v2"


def test_embedded_coordinator_drops_the_coordinator_and_flags_consumers(helm):
    docs = render(helm, values_file("embedded-coordinator-values.yaml"))
    assert not [d for d in docs if "coordinator" in d["metadata"]["name"]]
    billing = consumers(docs)["billing"]
    assert billing["spec"]["replicas"] == 4
    assert "--embedded-coordinator" in container(billing)["args"]


def test_coordinator_can_be_restricted_to_groups(helm):
    docs = render(helm, sets=("coordinator.groups={billing,Audit.v2_}",))
    args = container(named(docs, "Deployment", "t-pgcg-coordinator"))["args"]
    assert args == ["coordinator", "--group", "billing", "--group", "Audit.v2_"]


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_probes_hit_the_health_endpoints_on_the_http_port(helm, values):
    docs = render(helm, *([values] if values else []))
    config = named(docs, "ConfigMap", "t-pgcg")["data"]
    assert config["PGCG_HTTP_PORT"] == "9464"
    for deployment in of_kind(docs, "Deployment"):
        c = container(deployment)
        assert c["ports"] == [{"name": "http", "containerPort": 9464, "protocol": "TCP"}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_every_pod_runs_with_secure_defaults(helm, values):
    docs = render(helm, *([values] if values else []))
    assert workloads(docs)
    for workload in workloads(docs):
        spec = pod_spec(workload)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, kn(workload)
        assert pod["runAsUser"] == 10001
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        c = container(workload)["securityContext"]
        assert c["readOnlyRootFilesystem"] is True, kn(workload)
        assert c["allowPrivilegeEscalation"] is False
        assert c["privileged"] is False
        assert c["capabilities"] == {"drop": ["ALL"]}
        # The one writable place under a read-only root.
        mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


def test_chart_user_is_the_image_user():
    dockerfile = (REPO / "helm" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert "--uid 10001" in dockerfile and "--gid 10001" in dockerfile
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert values["podSecurityContext"]["runAsGroup"] == 10001


def test_pods_run_under_the_chart_service_account(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    account = of_kind(docs, "ServiceAccount")[0]
    assert account["automountServiceAccountToken"] is False
    for deployment in of_kind(docs, "Deployment"):
        assert pod_spec(deployment)["serviceAccountName"] == account["metadata"]["name"]
    # The hook runs before that account exists on first install.
    assert "serviceAccountName" not in pod_spec(of_kind(docs, "Job")[0])


# === grace period =============================================================================


def test_grace_period_outlasts_the_drain_deadline(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    drain = float(named(docs, "ConfigMap", "t-pgcg")["data"]["PGCG_DRAIN_DEADLINE"])
    by_group = consumers(docs)
    assert drain == 25
    assert pod_spec(by_group["billing"])["terminationGracePeriodSeconds"] == 45
    assert pod_spec(by_group["Audit.v2_"])["terminationGracePeriodSeconds"] == 60
    for deployment in by_group.values():
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > drain


def test_fractional_drain_deadline_rounds_the_grace_period_up(helm, tmp_path):
    values = write_values(
        tmp_path,
        "settings:\n  drainDeadline: 8.5\ngroups:\n  g:\n    topic: orders\n    handler: m:f\n",
    )
    docs = render(helm, values)
    assert named(docs, "ConfigMap", "t-pgcg")["data"]["PGCG_DRAIN_DEADLINE"] == "8.5"
    assert pod_spec(consumers(docs)["g"])["terminationGracePeriodSeconds"] == 29


def test_grace_period_not_above_the_drain_deadline_is_refused(helm):
    err = render_error(
        helm,
        sets=(
            "groups.g.topic=orders",
            "groups.g.handler=m:f",
            "groups.g.terminationGracePeriodSeconds=10",
        ),
    )
    assert (
        "groups.g: terminationGracePeriodSeconds (10) must exceed settings.drainDeadline (10)"
        in err
    )


# === configuration and the DSN ================================================================


def test_settings_reach_every_process_through_the_configmap(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    config = named(docs, "ConfigMap", "t-pgcg")["data"]
    assert config == {
        "PGCG_HEARTBEAT_INTERVAL": "2",
        "PGCG_SESSION_TIMEOUT": "10",
        "PGCG_DRAIN_DEADLINE": "25",
        "PGCG_LEADER_TIMEOUT": "10",
        "PGCG_MAX_ATTEMPTS": "10",
        "PGCG_LOG_LEVEL": "INFO",
        "PGCG_LOG_FORMAT": "json",
        "PGCG_HTTP_PORT": "9464",
        "OTEL_TRACES_EXPORTER": "none",
        "PGCG_EXAMPLE_SETTING": "on",
    }
    for deployment in of_kind(docs, "Deployment"):
        assert {"configMapRef": {"name": "t-pgcg"}} in container(deployment)["envFrom"]


def test_large_numbers_are_not_printed_in_exponent_form(helm):
    docs = render(helm, sets=("settings.maxAttempts=1000000",))
    assert named(docs, "ConfigMap", "t-pgcg")["data"]["PGCG_MAX_ATTEMPTS"] == "1000000"


def _pod_checksums(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {
        kn(d): {
            k: v
            for k, v in d["spec"]["template"]["metadata"]["annotations"].items()
            if k.startswith("checksum/")
        }
        for d in of_kind(docs, "Deployment")
    }


def test_pods_roll_when_the_configmap_or_dsn_changes_and_only_then(helm):
    base = values_file("groups-values.yaml")
    before = _pod_checksums(render(helm, base))
    assert all("checksum/config" in c for c in before.values())
    assert len({c["checksum/config"] for c in before.values()}) == 1
    changed = _pod_checksums(render(helm, base, sets=("settings.logLevel=DEBUG",)))
    for name in before:
        assert changed[name]["checksum/config"] != before[name]["checksum/config"], name
    new_dsn = _pod_checksums(render(helm, base, sets=("database.url=postgresql://other/pgcg",)))
    for name in before:
        assert new_dsn[name]["checksum/database"] != before[name]["checksum/database"], name
        assert new_dsn[name]["checksum/config"] == before[name]["checksum/config"], name
    unrelated = _pod_checksums(render(helm, base, sets=("coordinator.replicas=5",)))
    assert unrelated == before


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_dsn_is_referenced_from_a_secret_never_inlined(helm, values):
    docs = render(helm, *([values] if values else []))
    loaded = yaml.safe_load(values.read_text()) if values else {}
    url = (loaded.get("database") or {}).get("url") or "postgresql://pgcg@postgresql:5432/pgcg"
    secrets = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    for workload in workloads(docs):
        env = env_of(workload)
        ref = env["PGCG_DATABASE_URL"]
        assert "value" not in ref, kn(workload)
        secret_ref = ref["valueFrom"]["secretKeyRef"]
        existing = (loaded.get("database") or {}).get("existingSecret")
        if existing:
            assert secret_ref == {"name": existing, "key": loaded["database"]["existingSecretKey"]}
        else:
            assert secret_ref["name"] in secrets, kn(workload)
        assert url not in yaml.safe_dump(workload), f"the DSN is inlined in {kn(workload)}"


def test_existing_secret_means_the_chart_creates_none(helm):
    docs = render(helm, values_file("existing-secret-values.yaml"))
    assert of_kind(docs, "Secret") == []
    for workload in workloads(docs):
        assert env_of(workload)["PGCG_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "pgcg-database",
            "key": "dsn",
        }
        annotations = workload["spec"]["template"]["metadata"].get("annotations") or {}
        assert "checksum/database" not in annotations


def test_chart_made_secret_holds_the_url(helm):
    import base64

    docs = render(helm, sets=("database.url=postgresql://u:p@db:5432/app",))
    secret = named(docs, "Secret", "t-pgcg-database")
    assert (
        base64.b64decode(secret["data"]["database-url"]).decode() == "postgresql://u:p@db:5432/app"
    )
    assert "helm.sh/hook" not in (secret["metadata"].get("annotations") or {})


# === the migrations hook ======================================================================


def test_migrations_job_is_a_pre_install_and_pre_upgrade_hook(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    job = named(docs, "Job", "t-pgcg-migrations")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    # Its DSN: a hook-scoped Secret created before it (lower weight) and gone after it.
    hook_secret = named(docs, "Secret", "t-pgcg-migrations-database")
    secret_annotations = hook_secret["metadata"]["annotations"]
    assert set(secret_annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(secret_annotations["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    assert "hook-succeeded" in secret_annotations["helm.sh/hook-delete-policy"]
    assert env_of(job)["PGCG_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "t-pgcg-migrations-database",
        "key": "database-url",
    }
    # Nothing it needs may be a regular release object: those do not exist yet on install.
    assert "envFrom" not in container(job)


def test_migrations_job_migrates_then_creates_each_topic(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    c = container(named(docs, "Job", "t-pgcg-migrations"))
    assert c["command"] == ["/bin/sh", "-ec"]
    script = [line.strip() for line in c["args"][0].splitlines() if line.strip()]
    assert script == [
        "pgcg migrate",
        "pgcg topic create 'orders' --partitions 32 --if-not-exists",
        "pgcg topic create 'payments' --partitions 16 --if-not-exists",
    ]


def test_migrations_can_be_turned_off(helm):
    docs = render(helm, sets=("migrations.enabled=false",))
    assert of_kind(docs, "Job") == []
    assert [d["metadata"]["name"] for d in of_kind(docs, "Secret")] == ["t-pgcg-database"]


# === disruption budgets =======================================================================


def test_disruption_budgets_cover_each_group_and_the_coordinators(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    budgets = {d["metadata"]["name"]: d for d in of_kind(docs, "PodDisruptionBudget")}
    # Audit.v2_ turns its budget off.
    assert sorted(budgets) == ["t-pgcg-consumer-billing", "t-pgcg-coordinator"]
    for name, budget in budgets.items():
        deployment = named(docs, "Deployment", name)
        assert (
            budget["spec"]["selector"]["matchLabels"]
            == deployment["spec"]["selector"]["matchLabels"]
        )
        assert budget["spec"]["maxUnavailable"] == 1


def test_no_coordinator_budget_without_coordinators(helm):
    docs = render(helm, values_file("embedded-coordinator-values.yaml"))
    assert [d["metadata"]["name"] for d in of_kind(docs, "PodDisruptionBudget")] == [
        "t-pgcg-consumer-billing"
    ]


# === KEDA =====================================================================================


def test_chart_copy_of_the_lag_query_equals_the_named_query():
    """files/lag.sql is a copy (Helm reads files only inside the chart); this keeps it true."""
    chart_copy = strip_sql((CHART / "files" / "lag.sql").read_text())
    assert chart_copy == lag_query_from_status_sql()
    assert "%(group)s" in chart_copy


def test_keda_query_is_the_projects_lag_query_for_each_group(helm):
    docs = render(helm, values_file("keda-values.yaml"))
    scaled = {d["metadata"]["annotations"]["pgcg/group"]: d for d in of_kind(docs, "ScaledObject")}
    assert sorted(scaled) == ["billing", "shipping"]  # audit opts out
    for group, obj in scaled.items():
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "postgresql"
        expected = lag_query_from_status_sql().replace("%(group)s", f"'{group}'")
        assert " ".join(trigger["metadata"]["query"].split()) == expected
        # KEDA's trigger metadata is a map of strings.
        assert all(isinstance(v, str) for v in trigger["metadata"].values())


def test_keda_scales_the_group_deployment_and_owns_its_replicas(helm):
    docs = render(helm, values_file("keda-values.yaml"))
    by_group = consumers(docs)
    scaled = {d["metadata"]["annotations"]["pgcg/group"]: d for d in of_kind(docs, "ScaledObject")}
    billing = scaled["billing"]["spec"]
    assert billing["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": by_group["billing"]["metadata"]["name"],
    }
    assert "replicas" not in by_group["billing"]["spec"]
    assert "replicas" not in by_group["shipping"]["spec"]
    assert by_group["audit"]["spec"]["replicas"] == 2
    # Bounds: the topic's partitions unless set; a group's own keda keys win.
    assert (billing["minReplicaCount"], billing["maxReplicaCount"]) == (1, 12)
    shipping = scaled["shipping"]["spec"]
    assert (shipping["minReplicaCount"], shipping["maxReplicaCount"]) == (0, 6)
    assert billing["triggers"][0]["metadata"]["targetQueryValue"] == "500"
    assert shipping["triggers"][0]["metadata"]["activationTargetQueryValue"] == "10"
    assert billing["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600
    }


def test_keda_connects_with_the_consumers_secret_or_a_trigger_authentication(helm):
    docs = render(helm, values_file("keda-values.yaml"))
    by_group = consumers(docs)
    scaled = {d["metadata"]["annotations"]["pgcg/group"]: d for d in of_kind(docs, "ScaledObject")}
    billing = scaled["billing"]["spec"]["triggers"][0]
    env_name = billing["metadata"]["connectionFromEnv"]
    assert "secretKeyRef" in env_of(by_group["billing"])[env_name]["valueFrom"]
    assert "authenticationRef" not in billing
    shipping = scaled["shipping"]["spec"]["triggers"][0]
    assert "connectionFromEnv" not in shipping["metadata"]
    assert shipping["authenticationRef"] == {
        "name": "pgcg-keda-readonly",
        "kind": "TriggerAuthentication",
    }


def test_keda_is_off_by_default(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    assert of_kind(docs, "ScaledObject") == []


# === metrics and tracing ======================================================================


def test_service_monitor_scrapes_metrics_of_coordinators_and_consumers(helm):
    docs = render(helm, values_file("servicemonitor-values.yaml"))
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "15s")
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"
    assert service["spec"]["clusterIP"] == "None"
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), kn(deployment)
    # The Service's selector matches the Job's pod too; no port named http keeps it out.
    assert "ports" not in container(of_kind(docs, "Job")[0])


def test_no_service_monitor_by_default(helm):
    docs = render(helm)
    assert of_kind(docs, "ServiceMonitor") == [] and of_kind(docs, "Service") == []


def test_otlp_settings_reach_every_long_running_process(helm):
    docs = render(helm, values_file("otlp-values.yaml"))
    config = named(docs, "ConfigMap", "t-pgcg")["data"]
    assert config["OTEL_TRACES_EXPORTER"] == "otlp"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert config["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert config["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    for deployment in of_kind(docs, "Deployment"):
        env = env_of(deployment)
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert env["OTEL_SERVICE_NAME"]["value"] == f"t-pgcg-{component}"
        attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert "k8s.pod.name=$(POD_NAME)" in attributes
        assert f"k8s.deployment.name={deployment['metadata']['name']}" in attributes
        assert "deployment.environment=staging" in attributes
        names = list(env)
        # $(POD_NAME) expands only if POD_NAME comes earlier in the list.
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
        assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {
            "name": "otlp-credentials",
            "key": "headers",
        }


def test_otlp_is_off_by_default(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    assert named(docs, "ConfigMap", "t-pgcg")["data"]["OTEL_TRACES_EXPORTER"] == "none"
    for deployment in of_kind(docs, "Deployment"):
        assert not [n for n in env_of(deployment) if n.startswith("OTEL_")]


# === values that must be refused ==============================================================


@pytest.mark.parametrize(
    ("values_yaml", "expected"),
    [
        pytest.param(
            "groups:\n  'orders group':\n    topic: orders\n    handler: m:f\n",
            ["invalid propertyName 'orders group'", GROUP_RE],
            id="group-name",
        ),
        pytest.param(
            "groups:\n  g:\n    topic: Orders\n    handler: m:f\n",
            ["/groups/g/topic", "'Orders' does not match pattern", TOPIC_RE],
            id="group-topic-name",
        ),
        pytest.param(
            "topics:\n  - name: orders-v2\n",
            ["/topics/0/name", "'orders-v2' does not match pattern"],
            id="topic-name",
        ),
        pytest.param(
            "groups:\n  g:\n    topic: orders\n",
            ["/groups/g", "missing property 'handler'"],
            id="missing-handler",
        ),
        pytest.param(
            "groups:\n  g:\n    topic: orders\n    handler: handlers.py\n",
            ["/groups/g/handler", "does not match pattern"],
            id="handler-without-function",
        ),
        pytest.param(
            "groups:\n  g:\n    topic: orders\n    handler: m:f\n    replicas: three\n",
            ["/groups/g/replicas", "got string, want integer"],
            id="replicas-type",
        ),
        pytest.param(
            "groups:\n  g:\n    topic: orders\n    handler: m:f\n    replica: 3\n",
            ["/groups/g", "additional properties 'replica' not allowed"],
            id="typo-in-group",
        ),
        pytest.param(
            "settings:\n  logFormat: xml\n",
            ["/settings/logFormat", "value must be one of 'json', 'text'"],
            id="log-format",
        ),
        pytest.param(
            "keda:\n  enabled: true\n  lagThreshold: 0\n",
            ["/keda/lagThreshold"],
            id="keda-threshold",
        ),
        pytest.param(
            "coordinator:\n  replicas: -1\n",
            ["/coordinator/replicas", "minimum"],
            id="negative-replicas",
        ),
    ],
)
def test_values_breaking_the_schema_fail_with_a_clear_message(
    helm, tmp_path, values_yaml, expected
):
    err = render_error(helm, write_values(tmp_path, values_yaml))
    assert "values don't meet the specifications of the schema" in err
    for fragment in expected:
        assert fragment in err, err
    # `helm lint --strict` refuses them too.
    result = _run(helm, "lint", "--strict", str(CHART), "-f", str(tmp_path / "values.yaml"))
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        pytest.param(
            ("database.url=",),
            "set database.existingSecret (the name of a Secret holding the DSN) or database.url",
            id="no-dsn",
        ),
        pytest.param(
            ("otlp.enabled=true",),
            "otlp.enabled is true but otlp.endpoint is empty",
            id="otlp-without-endpoint",
        ),
        pytest.param(
            ("settings.drainDeadline=2",),
            "settings.drainDeadline (2) must be at least settings.sessionTimeout minus the "
            "lease margin (8)",
            id="drain-deadline-below-lease",
        ),
        pytest.param(
            ("settings.heartbeatInterval=10",),
            "settings.heartbeatInterval (10) must be less than settings.sessionTimeout (10)",
            id="heartbeat-vs-session",
        ),
        pytest.param(
            (
                "groups.Orders.topic=orders",
                "groups.Orders.handler=m:f",
                "groups.orders.topic=orders",
                "groups.orders.handler=m:f",
            ),
            'groups "Orders" and "orders" would both be deployed as t-pgcg-consumer-orders',
            id="group-name-collision",
        ),
        pytest.param(
            (
                "groups.g.topic=orders",
                "groups.g.handler=m:f",
                "groups.g.keda.enabled=true",
                "groups.g.keda.minReplicaCount=20",
            ),
            "groups.g: keda.minReplicaCount (20) exceeds keda.maxReplicaCount (16)",
            id="keda-bounds",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(helm, sets, expected):
    assert expected in render_error(helm, sets=sets)


# === NOTES ====================================================================================


def test_notes_say_how_to_watch_rebalancing(helm):
    text = notes(helm, values_file("groups-values.yaml"))
    assert (
        "kubectl logs -n default -l app.kubernetes.io/instance=t,app.kubernetes.io/name=pgcg"
        in text
    )
    assert '| grep \'"action": "rebalance"\'' in text
    assert "kubectl exec -n default -it deploy/t-pgcg-coordinator -- pgcg status --watch" in text
    assert "billing: deployment/t-pgcg-consumer-billing" in text


def test_notes_point_at_a_consumer_when_the_coordinator_is_embedded(helm):
    text = notes(helm, values_file("embedded-coordinator-values.yaml"))
    assert (
        "kubectl exec -n default -it deploy/t-pgcg-consumer-billing -- pgcg status --watch" in text
    )
    assert "deploy/t-pgcg-coordinator" not in text
