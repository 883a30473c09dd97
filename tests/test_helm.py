"""The Helm chart in helm/pgcg, rendered by a real helm binary.

No cluster: `helm lint --strict`, `helm template` for the default values and every
ci/*-values.yaml, the rendered manifests checked against the Kubernetes 1.30 schemas, and
assertions on the rendered objects, one group of tests per feature. The settings schema
is in test_helm_settings.py, the rolling update replayed with real processes in
test_helm_rollout.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("pyyaml is in the test extra: pip install -e '.[test]'", allow_module_level=True)

from tests.chart import (
    CHART,
    CI_VALUES,
    REPO,
    Doc,
    config_of,
    consumers,
    container,
    env_of,
    flag,
    kn,
    missing_tool,
    named,
    of_kind,
    pod_spec,
    render,
    render_error,
    run,
    template_text,
    values_file,
    workloads,
    write_values,
)

KUBERNETES_VERSION = "1.30.0"
# Custom resources the chart renders; kubernetes-validate has no schema for them.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
GROUP_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$"
TOPIC_RE = r"^[a-z][a-z0-9_]{0,39}$"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
GROUP = "groups.g.topic=orders", "groups.g.handler=m:f"


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate")
    return kubernetes_validate


def pod_template(doc: Doc) -> Doc:
    return doc["spec"]["template"]


def checksums(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {
        kn(d): {
            k: v
            for k, v in pod_template(d)["metadata"]["annotations"].items()
            if k.startswith("checksum/")
        }
        for d in of_kind(docs, "Deployment")
    }


def templates(docs: list[Doc]) -> dict[str, Doc]:
    return {kn(d): pod_template(d) for d in of_kind(docs, "Deployment")}


# === lint and schemas =========================================================================

ALL_VALUES = [None, *CI_VALUES]
VALUES_IDS = ["default", *(p.name for p in CI_VALUES)]


def test_ci_values_cover_each_optional_feature():
    names = {p.name for p in CI_VALUES}
    for feature in (
        "keda",
        "servicemonitor",
        "otlp",
        "embedded-coordinator",
        "existing-secret",
        "platform",
        "migrations-secret",
    ):
        assert f"{feature}-values.yaml" in names


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = run(helm, *args)
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


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_no_mapping_has_a_key_twice(helm, values):
    """Flux and kustomize refuse a manifest with a duplicate key; PyYAML keeps the last."""

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [loader.construct_object(k) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        assert not duplicates, f"duplicate keys {duplicates} at {node.start_mark}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    text = template_text(
        helm,
        *([values] if values else []),
        sets=("commonLabels.app\\.kubernetes\\.io/part-of=shop", "commonLabels.team=payments"),
    )
    assert list(yaml.load_all(text, Loader=Strict))


def test_kubernetes_validate_cli_accepts_a_render(helm, kubernetes_validate):
    """The exact command docs/helm.md gives, so the docs stay true."""
    beside_python = Path(sys.executable).parent / "kubernetes-validate"
    cli = str(beside_python) if beside_python.exists() else shutil.which("kubernetes-validate")
    if cli is None:
        missing_tool("kubernetes-validate command")
    result = subprocess.run(
        [cli, "--strict", "-k", KUBERNETES_VERSION, "-"],
        input=template_text(helm, values_file("keda-values.yaml")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_metadata_states_kubernetes_versions_and_sources(helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.27.0-0"
    assert chart["home"].startswith("https://")
    assert chart["sources"] and all(s.startswith("https://") for s in chart["sources"])
    result = run(helm, "template", "t", str(CHART), "--kube-version", "1.26.0")
    assert result.returncode != 0 and "kubeVersion" in result.stderr


# === names and labels =========================================================================


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_names_and_labels_are_valid_and_standard(helm, values):
    docs = render(helm, *([values] if values else []))
    for doc in docs:
        meta = doc["metadata"]
        assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, kn(doc)
        if "handler-config" in meta["name"] or doc["kind"] == "TriggerAuthentication":
            continue  # extraObjects: the user's own
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
        pod_labels = pod_template(workload)["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), kn(workload)
        assert "helm.sh/chart" not in selector, "a selector must not change between chart versions"


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_pod_templates_carry_only_selector_labels_and_pod_labels(helm, values):
    docs = render(helm, *([values] if values else []), sets=("commonLabels.team=payments",))
    for workload in workloads(docs):
        labels = pod_template(workload)["metadata"]["labels"]
        selector = (workload["spec"].get("selector") or {}).get("matchLabels", {})
        assert labels.keys() >= SELECTOR_KEYS
        assert not {"helm.sh/chart", "app.kubernetes.io/version", "team"} & labels.keys(), kn(
            workload
        )
        if workload["kind"] == "Deployment":
            assert labels == selector, kn(workload)


def test_pod_labels_are_added_to_the_pod_template(helm):
    docs = render(
        helm,
        sets=(*GROUP, "consumer.podLabels.tier=batch", "groups.g.podLabels.cost-center=c42"),
    )
    labels = pod_template(consumers(docs)["g"])["metadata"]["labels"]
    assert labels["tier"] == "batch" and labels["cost-center"] == "c42"


def test_a_chart_or_version_bump_changes_no_pod_template(helm, tmp_path):
    """Every consumer of every group restarting on a chart upgrade is a rebalance storm."""
    bumped = tmp_path / "pgcg"
    shutil.copytree(CHART, bumped)
    chart_yaml = bumped / "Chart.yaml"
    text = chart_yaml.read_text()
    text = re.sub(r"(?m)^version: .*$", "version: 9.9.9", text)
    chart_yaml.write_text(text)
    values = values_file("groups-values.yaml")
    before = render(helm, values)
    after = render(helm, values, chart=bumped)
    assert templates(after) == templates(before)
    assert {d["metadata"]["labels"]["helm.sh/chart"] for d in after} == {"pgcg-9.9.9"}


def test_an_image_tag_change_rolls_only_the_workloads_running_that_image(helm):
    values = values_file("groups-values.yaml")
    before = templates(render(helm, values))
    after = templates(render(helm, values, sets=("image.tag=0.1.1",)))
    changed = {name for name in before if before[name] != after[name]}
    # Audit.v2_ runs its own image.
    assert changed == {
        "Deployment/t-pgcg-coordinator",
        "Deployment/t-pgcg-consumer-billing",
        "Deployment/t-pgcg-consumer-shipping",
    }


def test_a_group_with_its_own_image_carries_its_own_version_label(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    for doc in docs:
        group = (doc["metadata"].get("annotations") or {}).get("pgcg/group")
        version = doc["metadata"]["labels"]["app.kubernetes.io/version"]
        assert version == ("2.1.0" if group == "Audit.v2_" else "0.1.0"), kn(doc)


def test_selectors_of_different_deployments_do_not_overlap(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    deployments = of_kind(docs, "Deployment")
    for a in deployments:
        for b in deployments:
            if a is not b:
                sel = a["spec"]["selector"]["matchLabels"]
                other = pod_template(b)["metadata"]["labels"]
                assert not sel.items() <= other.items(), f"{kn(a)} would adopt pods of {kn(b)}"


# === checksums: each workload rolls on what it reads ==========================================


def test_each_workload_rolls_only_when_what_it_reads_changes(helm):
    base = values_file("groups-values.yaml")
    before = checksums(render(helm, base))
    coordinator = "Deployment/t-pgcg-coordinator"
    billing, audit, shipping = (
        f"Deployment/t-pgcg-consumer-{g}" for g in ("billing", "audit-v2", "shipping")
    )

    def rolled(*sets: str) -> set[str]:
        after = checksums(render(helm, base, sets=sets))
        return {name for name in before if after[name] != before[name]}

    assert rolled("settings.leaderTimeout=20") == {coordinator}
    assert rolled("settings.visibilityTimeout=120") == {billing, audit, shipping}
    assert rolled("groups.billing.settings.concurrency=30") == {billing}
    assert rolled("settings.logLevel=DEBUG") == {coordinator, billing, audit, shipping}
    assert rolled("database.url=postgresql://other/pgcg") == {
        coordinator,
        billing,
        audit,
        shipping,
    }
    # Neither labels, replicas, budgets nor the chart's own metadata are read by a pod.
    assert (
        rolled(
            "commonLabels.team=payments",
            "coordinator.replicas=5",
            "groups.billing.replicas=7",
            "groups.billing.podDisruptionBudget.maxUnavailable=2",
        )
        == set()
    )


def test_with_an_embedded_coordinator_consumers_read_the_coordinator_settings(helm):
    base = values_file("embedded-coordinator-values.yaml")
    before = checksums(render(helm, base))
    after = checksums(render(helm, base, sets=("settings.leaderTimeout=20",)))
    assert after != before
    config = config_of(render(helm, base), consumers(render(helm, base))["billing"])
    assert config["PGCG_LEADER_TIMEOUT"] == "10"


# === workloads ================================================================================


def test_default_values_render_coordinators_migrations_and_no_consumers(helm):
    docs = render(helm)
    assert sorted(kn(d) for d in docs) == [
        "ConfigMap/t-pgcg-coordinator",
        "Deployment/t-pgcg-coordinator",
        "Job/t-pgcg-migrations",
        "Pod/t-pgcg-test-status",
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
    assert consumers(render(helm, sets=GROUP))["g"]["spec"]["replicas"] == 2


def test_consumer_runs_its_group_topic_and_handler(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    by_group = consumers(docs)
    billing = container(by_group["billing"])
    assert billing["command"] == ["pgcg"]
    args = billing["args"]
    assert args[0] == "consumer"
    assert flag(args, "--group") == "billing"
    assert flag(args, "--topic") == "orders"
    assert flag(args, "--handler") == "billing.handlers:handle_order"
    assert "--embedded-coordinator" not in args
    audit = container(by_group["Audit.v2_"])
    assert flag(audit["args"], "--group") == "Audit.v2_"
    # Per-group image, resources and env; defaults elsewhere.
    assert audit["image"] == "registry.example.com/audit-consumer:2.1.0"
    assert billing["image"] == "pgcg:0.1.0"
    assert billing["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    assert env_of(by_group["billing"])["BILLING_MODE"]["value"] == "live"
    assert "BILLING_MODE" not in env_of(by_group["Audit.v2_"])


def test_several_groups_may_consume_one_topic(helm):
    by_group = consumers(render(helm, values_file("groups-values.yaml")))
    topics = {g: flag(container(d)["args"], "--topic") for g, d in by_group.items()}
    assert topics["billing"] == topics["shipping"] == "orders"


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
    for deployment in of_kind(docs, "Deployment"):
        assert config_of(docs, deployment)["PGCG_HTTP_PORT"] == "9464"
        c = container(deployment)
        assert c["ports"] == [{"name": "http", "containerPort": 9464, "protocol": "TCP"}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_every_pod_runs_with_secure_defaults(helm, values):
    docs = render(helm, *([values] if values else []))
    pods = [*workloads(docs), *of_kind(docs, "Pod")]
    assert pods
    for workload in pods:
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


def test_every_workload_requests_resources_by_default(helm):
    docs = render(helm, sets=GROUP)
    for pod in [*workloads(docs), *of_kind(docs, "Pod")]:
        requests = container(pod)["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], kn(pod)


# === rolling updates ==========================================================================


def test_consumers_roll_one_at_a_time_and_never_below_their_count(helm):
    deployment = consumers(render(helm, sets=GROUP))["g"]
    spec = deployment["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    # Ready must last one session timeout: 10 s by default, the group's own if it has one.
    assert spec["minReadySeconds"] == 10
    assert spec["revisionHistoryLimit"] == 3
    own = consumers(
        render(
            helm,
            sets=(
                *GROUP,
                "groups.g.settings.sessionTimeout=12.5",
                "groups.g.settings.drainDeadline=12",
            ),
        )
    )["g"]
    assert own["spec"]["minReadySeconds"] == 13
    set_ = consumers(
        render(helm, sets=(*GROUP, "groups.g.minReadySeconds=0", "groups.g.revisionHistoryLimit=1"))
    )["g"]["spec"]
    assert (set_["minReadySeconds"], set_["revisionHistoryLimit"]) == (0, 1)


def test_a_group_can_switch_to_recreate(helm):
    spec = consumers(render(helm, sets=(*GROUP, "groups.g.strategy.type=Recreate")))["g"]["spec"]
    assert spec["strategy"] == {"type": "Recreate"}


def test_consumer_readiness_probe_reads_the_assignment_aware_readyz(helm):
    probe = container(consumers(render(helm, sets=GROUP))["g"])["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": "http"}
    # A hand-off is noticed within a probe period or two, not a 10 s one.
    assert probe["periodSeconds"] <= 2


# === values that merge key by key =============================================================


def test_a_group_budget_override_keeps_the_budget(helm):
    docs = render(helm, sets=(*GROUP, "groups.g.podDisruptionBudget.minAvailable=1"))
    budget = named(docs, "PodDisruptionBudget", "t-pgcg-consumer-g")
    assert budget["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in budget["spec"]


def test_a_group_probe_override_keeps_the_probe_handler(helm):
    deployment = consumers(render(helm, sets=(*GROUP, "groups.g.livenessProbe.failureThreshold=6")))
    probe = container(deployment["g"])["livenessProbe"]
    assert probe["failureThreshold"] == 6
    assert probe["httpGet"] == {"path": "/healthz", "port": "http"}


def test_false_and_zero_override_and_null_removes(helm, tmp_path):
    values = write_values(
        tmp_path,
        """
groups:
  g:
    topic: orders
    handler: m:f
    replicas: 0
    podDisruptionBudget:
      enabled: false
    startupProbe: null
    livenessProbe:
      httpGet: null
      exec:
        command: [pgcg, --version]
""",
    )
    docs = render(helm, values)
    deployment = consumers(docs)["g"]
    assert deployment["spec"]["replicas"] == 0
    assert of_kind(docs, "PodDisruptionBudget") == [
        named(docs, "PodDisruptionBudget", "t-pgcg-coordinator")
    ]
    c = container(deployment)
    assert "startupProbe" not in c
    assert c["livenessProbe"]["exec"] == {"command": ["pgcg", "--version"]}
    assert "httpGet" not in c["livenessProbe"]


# === per-group settings and the grace period ==================================================


def test_settings_reach_each_workload_through_its_own_configmap(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    coordinator = config_of(docs, named(docs, "Deployment", "t-pgcg-coordinator"))
    assert coordinator == {
        "PGCG_HEARTBEAT_INTERVAL": "2",
        "PGCG_SESSION_TIMEOUT": "10",
        "PGCG_DRAIN_DEADLINE": "25",
        "PGCG_LEADER_TIMEOUT": "10",
        "PGCG_LOG_LEVEL": "INFO",
        "PGCG_LOG_FORMAT": "json",
        "PGCG_HTTP_PORT": "9464",
        "OTEL_TRACES_EXPORTER": "none",
        "PGCG_EXAMPLE_SETTING": "on",
    }
    by_group = consumers(docs)
    billing = config_of(docs, by_group["billing"])
    assert billing == {
        "PGCG_HEARTBEAT_INTERVAL": "2",
        "PGCG_SESSION_TIMEOUT": "10",
        "PGCG_DRAIN_DEADLINE": "25",
        "PGCG_MAX_ATTEMPTS": "5",
        "PGCG_CONCURRENCY": "20",
        "PGCG_LOG_LEVEL": "INFO",
        "PGCG_LOG_FORMAT": "json",
        "PGCG_HTTP_PORT": "9464",
        "OTEL_TRACES_EXPORTER": "none",
        "PGCG_EXAMPLE_SETTING": "on",
    }
    assert config_of(docs, by_group["shipping"])["PGCG_MAX_ATTEMPTS"] == "10"
    assert "PGCG_CONCURRENCY" not in config_of(docs, by_group["shipping"])


def test_the_checked_settings_win_over_extra_env_from(helm):
    docs = render(
        helm, sets=(*GROUP, "groups.g.extraEnvFrom[0].configMapRef.name=handler-settings")
    )
    sources = container(consumers(docs)["g"])["envFrom"]
    assert sources == [
        {"configMapRef": {"name": "handler-settings"}},
        {"configMapRef": {"name": "t-pgcg-consumer-g"}},
    ]


def test_grace_period_covers_the_group_drain_deadline_and_leaving(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    by_group = consumers(docs)
    assert config_of(docs, by_group["billing"])["PGCG_DRAIN_DEADLINE"] == "25"
    assert pod_spec(by_group["billing"])["terminationGracePeriodSeconds"] == 45
    assert pod_spec(by_group["Audit.v2_"])["terminationGracePeriodSeconds"] == 60
    own = consumers(render(helm, sets=(*GROUP, "groups.g.settings.drainDeadline=40")))["g"]
    assert pod_spec(own)["terminationGracePeriodSeconds"] == 60


def test_fractional_drain_deadline_rounds_the_grace_period_up(helm):
    docs = render(helm, sets=(*GROUP, "settings.drainDeadline=8.5"))
    assert config_of(docs, consumers(docs)["g"])["PGCG_DRAIN_DEADLINE"] == "8.5"
    assert pod_spec(consumers(docs)["g"])["terminationGracePeriodSeconds"] == 29


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        pytest.param(
            ("groups.g.terminationGracePeriodSeconds=19",),
            "groups.g: terminationGracePeriodSeconds (19) must be at least the drain deadline "
            "(10 s) plus 10 s to flush, release and leave (20)",
            id="grace-below-drain-plus-leave",
        ),
        pytest.param(
            ("groups.g.settings.drainDeadline=30", "groups.g.terminationGracePeriodSeconds=35"),
            "groups.g: terminationGracePeriodSeconds (35) must be at least the drain deadline "
            "(30 s)",
            id="grace-below-group-drain",
        ),
        pytest.param(
            ("groups.g.extraEnv[0].name=PGCG_DRAIN_DEADLINE", "groups.g.extraEnv[0].value=300"),
            "groups.g.extraEnv sets PGCG_DRAIN_DEADLINE: use the setting in settings",
            id="extra-env-drain-deadline",
        ),
        pytest.param(
            ("coordinator.extraEnv[0].name=PGCG_DATABASE_URL", "coordinator.extraEnv[0].value=x"),
            "coordinator.extraEnv sets PGCG_DATABASE_URL",
            id="extra-env-dsn",
        ),
    ],
)
def test_grace_period_and_env_that_would_escape_the_checks_are_refused(helm, sets, expected):
    assert expected in render_error(helm, sets=(*GROUP, *sets))


def test_grace_period_at_the_minimum_is_accepted(helm):
    docs = render(helm, sets=(*GROUP, "groups.g.terminationGracePeriodSeconds=20"))
    assert pod_spec(consumers(docs)["g"])["terminationGracePeriodSeconds"] == 20


# === labels and extra settings ================================================================


@pytest.mark.parametrize(
    ("values_yaml", "path"),
    [
        (
            "commonLabels:\n  app.kubernetes.io/name: other\n",
            "/commonLabels/app.kubernetes.io~1name",
        ),
        (
            "coordinator:\n  podLabels:\n    app.kubernetes.io/instance: other\n",
            "/coordinator/podLabels/app.kubernetes.io~1instance",
        ),
        ("consumer:\n  podLabels:\n    pgcg/group: other\n", "/consumer/podLabels/pgcg~1group"),
        ("commonLabels:\n  helm.sh/chart: other\n", "/commonLabels/helm.sh~1chart"),
    ],
    ids=["common-name", "coordinator-instance", "consumer-group", "common-chart"],
)
def test_reserved_label_keys_are_refused(helm, tmp_path, values_yaml, path):
    err = render_error(helm, write_values(tmp_path, values_yaml))
    assert "values don't meet the specifications of the schema" in err
    assert f"at '{path}': false schema" in err


@pytest.mark.parametrize("key", ["PGCG_DATABASE_URL", "PGCG_DRAIN_DEADLINE", "PGCG_CONCURRENCY"])
def test_settings_extra_refuses_the_dsn_and_the_variables_of_settings(helm, key):
    err = render_error(helm, sets=(f"settings.extra.{key}=x",))
    assert f"at '/settings/extra/{key}': false schema" in err


def test_settings_extra_reaches_every_workload(helm):
    docs = render(helm, sets=(*GROUP, "settings.extra.HANDLER_MODE=live"))
    for deployment in of_kind(docs, "Deployment"):
        assert config_of(docs, deployment)["HANDLER_MODE"] == "live"


# === configuration and the DSN ================================================================


def test_large_numbers_are_not_printed_in_exponent_form(helm):
    docs = render(helm, sets=(*GROUP, "settings.maxPayloadBytes=10000000"))
    assert config_of(docs, consumers(docs)["g"])["PGCG_MAX_PAYLOAD_BYTES"] == "10000000"


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_dsn_is_referenced_from_a_secret_never_inlined(helm, values):
    docs = render(helm, *([values] if values else []))
    loaded = yaml.safe_load(values.read_text()) if values else {}
    url = (loaded.get("database") or {}).get("url") or "postgresql://pgcg@postgresql:5432/pgcg"
    secrets = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    for workload in [*workloads(docs), *of_kind(docs, "Pod")]:
        ref = env_of(workload)["PGCG_DATABASE_URL"]
        assert "value" not in ref, kn(workload)
        secret_ref = ref["valueFrom"]["secretKeyRef"]
        existing = (loaded.get("database") or {}).get("existingSecret")
        migrator = (loaded.get("migrations") or {}).get("existingSecret")
        if workload["kind"] == "Job" and migrator:
            assert secret_ref["name"] == migrator
        elif existing:
            key = loaded["database"].get("existingSecretKey", "database-url")
            assert secret_ref == {"name": existing, "key": key}
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
        annotations = pod_template(workload)["metadata"].get("annotations") or {}
        assert "checksum/database" not in annotations


def test_chart_made_secret_holds_the_url(helm):
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
    # Its DSN: a hook-scoped Secret created before it (lower weight) and gone after it,
    # whether the Job succeeds or fails (Helm 4 deletes an earlier hook by its
    # hook-succeeded policy when a later one fails).
    hook_secret = named(docs, "Secret", "t-pgcg-migrations-database")
    secret_annotations = hook_secret["metadata"]["annotations"]
    assert set(secret_annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(secret_annotations["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    policy = set(secret_annotations["helm.sh/hook-delete-policy"].split(","))
    assert {"hook-succeeded", "hook-failed", "before-hook-creation"} <= policy
    assert env_of(job)["PGCG_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "t-pgcg-migrations-database",
        "key": "database-url",
    }
    # Nothing it needs may be a regular release object: those do not exist yet on install.
    assert "envFrom" not in container(job)


def test_migrations_finish_within_helms_default_timeout(helm):
    job = named(render(helm), "Job", "t-pgcg-migrations")
    assert job["spec"]["activeDeadlineSeconds"] < 300  # helm --timeout defaults to 5m0s


def test_migrations_can_use_a_migrator_role_of_their_own(helm):
    docs = render(helm, values_file("migrations-secret-values.yaml"))
    job = named(docs, "Job", "t-pgcg-migrations")
    assert env_of(job)["PGCG_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "pgcg-migrator",
        "key": "dsn",
    }
    assert of_kind(docs, "Secret") == [], "no copy of any DSN"
    for deployment in of_kind(docs, "Deployment"):
        assert env_of(deployment)["PGCG_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == (
            "pgcg-runtime"
        )


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


# === disruption budgets and placement =========================================================


def test_disruption_budgets_cover_each_group_and_the_coordinators(helm):
    docs = render(helm, values_file("groups-values.yaml"))
    budgets = {d["metadata"]["name"]: d for d in of_kind(docs, "PodDisruptionBudget")}
    # Audit.v2_ turns its budget off.
    assert sorted(budgets) == [
        "t-pgcg-consumer-billing",
        "t-pgcg-consumer-shipping",
        "t-pgcg-coordinator",
    ]
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


def test_coordinators_prefer_different_nodes_and_zones_by_default(helm):
    coordinator = named(render(helm), "Deployment", "t-pgcg-coordinator")
    spec = pod_spec(coordinator)
    selector = coordinator["spec"]["selector"]["matchLabels"]
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == selector
    # Your own replaces it; defaultSpread: false drops it.
    own = pod_spec(
        named(
            render(helm, sets=("coordinator.affinity.nodeAffinity.x=y",)),
            "Deployment",
            "t-pgcg-coordinator",
        )
    )
    assert own["affinity"] == {"nodeAffinity": {"x": "y"}}
    off = pod_spec(
        named(
            render(helm, sets=("coordinator.defaultSpread=false",)),
            "Deployment",
            "t-pgcg-coordinator",
        )
    )
    assert "affinity" not in off and "topologySpreadConstraints" not in off


# === extra pod parts and objects ==============================================================


def test_volumes_init_containers_and_sidecars_are_added(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    billing = pod_spec(consumers(docs)["billing"])
    assert [c["name"] for c in billing["containers"]] == ["consumer", "cloud-sql-proxy"]
    assert [c["name"] for c in billing["initContainers"]] == ["wait-for-proxy-config"]
    assert {v["name"] for v in billing["volumes"]} == {"tmp", "db-ca"}
    mounts = {m["name"]: m["mountPath"] for m in billing["containers"][0]["volumeMounts"]}
    assert mounts == {"tmp": "/tmp", "db-ca": "/etc/pgcg/ca"}
    coordinator = pod_spec(named(docs, "Deployment", "t-pgcg-coordinator"))
    assert {v["name"] for v in coordinator["volumes"]} == {"tmp", "db-ca"}


def test_extra_objects_are_rendered_with_tpl(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    auth = named(docs, "TriggerAuthentication", "t-keda-readonly")
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "connection"
    assert named(docs, "ConfigMap", "t-pgcg-handler-config")["data"] == {"mode": "live"}


# === KEDA =====================================================================================


def test_keda_query_calls_the_group_lag_function_for_each_group(helm):
    docs = render(helm, values_file("keda-values.yaml"))
    scaled = {d["metadata"]["annotations"]["pgcg/group"]: d for d in of_kind(docs, "ScaledObject")}
    assert sorted(scaled) == ["billing", "shipping"]  # audit opts out
    for group, obj in scaled.items():
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "postgresql"
        assert trigger["metadata"]["query"] == (
            f"SELECT coalesce(sum(lag), 0) AS lag FROM pgcg.group_lag('{group}')"
        )
        assert trigger["useCachedMetrics"] is True
        # KEDA's trigger metadata is a map of strings.
        assert all(isinstance(v, str) for v in trigger["metadata"].values())


def test_keda_query_runs_and_counts_each_group_on_a_shared_topic(helm, db, dsn):
    """The rendered query against PostgreSQL: two groups on one topic, each its own lag."""
    from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync

    docs = render(helm, values_file("keda-values.yaml"))
    db.execute("SELECT pgcg.create_topic('orders', 4)")
    for group in ("billing", "shipping"):
        db.execute("SELECT pgcg.create_group(%s, 'orders')", (group,))
    enqueue_many_sync(db, "orders", [OutgoingMessage(f"k{i}", {"n": i}) for i in range(7)])
    for obj in of_kind(docs, "ScaledObject"):
        query = obj["spec"]["triggers"][0]["metadata"]["query"]
        row = db.execute(query).fetchone()
        assert row is not None and list(row) == ["lag"] and row["lag"] == 7


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


def test_keda_scales_up_a_few_consumers_per_period_and_down_one(helm):
    docs = render(helm, sets=(*GROUP, "keda.enabled=true"))
    (scaled,) = of_kind(docs, "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 2, "periodSeconds": 60}]
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    # `advanced` of the values is merged over it, key by key.
    keda = render(helm, values_file("keda-values.yaml"))
    billing = next(d for d in of_kind(keda, "ScaledObject") if "billing" in d["metadata"]["name"])
    merged = billing["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert merged["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert merged["scaleDown"]["policies"] == behavior["scaleDown"]["policies"]
    assert merged["scaleUp"] == behavior["scaleUp"]


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


# === metrics, alerts, dashboard ===============================================================


def exported_metric_names() -> set[str]:
    """Every metric family pgcg exports on /metrics, from its own instruments."""
    from prometheus_client import generate_latest

    from pgcg.shared import metrics
    from tests.otel import install

    otel = install()
    a = {"messaging.consumer.group.name": "names-probe", "messaging.destination.name": "t"}
    metrics.rebalances.add(1, {**a, "pgcg.reason": "x"})
    metrics.partitions_moved.add(1, {**a, "pgcg.kind": "assign"})
    for counter in (metrics.processed, metrics.retried, metrics.dead_lettered):
        counter.add(1, a)
    metrics.rebalance_duration.record(0.1, a)
    metrics.process_duration.record(0.1, a)
    stops = [metrics.add_source(g, lambda: [(1.0, a)]) for g in metrics.GAUGES]
    try:
        text = generate_latest(otel.registry).decode()
    finally:
        for stop in stops:
            stop()
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    names = {name for name, _ in families}
    names |= {f"{name}_{suffix}" for name, kind in families if kind == "histogram"
              for suffix in ("bucket", "sum", "count")}  # fmt: skip
    return names


def metrics_in(expression: str) -> set[str]:
    """The metric names of a PromQL expression (each is followed by its label selector)."""
    return set(re.findall(r"\b((?:pgcg|messaging)_[a-z_]+)\{", expression))


def test_alerts_use_only_metrics_pgcg_exports(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    (rule,) = of_kind(docs, "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    exported = exported_metric_names()
    alerts = {}
    for r in group["rules"]:
        assert metrics_in(r["expr"]) <= exported, r["expr"]
        alerts.setdefault(r["labels"]["group"], set()).add(r["alert"])
    expected = {
        "PgcgGroupLagHigh",
        "PgcgGroupLagOld",
        "PgcgNoLeader",
        "PgcgRebalanceStorm",
        "PgcgHeartbeatLate",
        "PgcgDeadLetters",
    }
    assert alerts == {"billing": expected, "shipping": expected}
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert all(r["labels"]["team"] == "payments" for r in group["rules"])


def test_heartbeat_alert_follows_each_group_session_timeout(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    rules = of_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    late = {r["labels"]["group"]: r["expr"] for r in rules if r["alert"] == "PgcgHeartbeatLate"}
    assert late["billing"].endswith("> 5")  # half of 10 s
    assert late["shipping"].endswith("> 10")  # half of its own 20 s


def test_dashboard_is_a_labelled_configmap_of_exported_metrics(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    configmap = named(docs, "ConfigMap", "t-pgcg-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "grafana"
    dashboard = json.loads(configmap["data"]["pgcg.json"])
    exported = exported_metric_names()
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert expressions
    for expression in expressions:
        assert metrics_in(expression) and metrics_in(expression) <= exported, expression


def test_pod_monitor_scrapes_coordinators_and_consumers_with_their_group(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert "pgcg/group" in monitor["spec"]["podTargetLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    for deployment in of_kind(docs, "Deployment"):
        labels = pod_template(deployment)["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        assert labels[expression["key"]] in expression["values"]
    job_labels = pod_template(of_kind(docs, "Job")[0])["metadata"]["labels"]
    assert job_labels[expression["key"]] not in expression["values"]


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
        labels = pod_template(deployment)["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), kn(deployment)
    # The Service's selector matches the Job's pod too; no port named http keeps it out.
    assert "ports" not in container(of_kind(docs, "Job")[0])


def test_one_monitor_at_a_time(helm):
    err = render_error(
        helm, sets=("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true")
    )
    assert "enable one of them" in err


def test_no_monitoring_objects_by_default(helm):
    docs = render(helm, sets=GROUP)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Service"}
    assert "NetworkPolicy" not in kinds


# === network policy ===========================================================================


def test_network_policy_allows_postgres_otlp_dns_out_and_metrics_in(helm):
    docs = render(helm, values_file("platform-values.yaml"))
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    for pod in [*workloads(docs), *of_kind(docs, "Pod")]:
        labels = (pod_template(pod) if pod["kind"] != "Pod" else pod)["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items(), kn(pod)
    (ingress,) = spec["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    database, otlp, dns = spec["egress"]
    assert [p["port"] for p in database["ports"]] == [5432, 6432]
    assert database["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert otlp["ports"] == [{"port": 4318, "protocol": "TCP"}]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}


def test_network_policy_otlp_port_follows_the_endpoint(helm):
    sets = (
        "networkPolicy.enabled=true",
        "otlp.enabled=true",
        "otlp.endpoint=http://collector:55681",
    )
    (policy,) = of_kind(render(helm, sets=sets), "NetworkPolicy")
    assert policy["spec"]["egress"][1]["ports"] == [{"port": 55681, "protocol": "TCP"}]
    (no_otlp,) = of_kind(render(helm, sets=("networkPolicy.enabled=true",)), "NetworkPolicy")
    assert len(no_otlp["spec"]["egress"]) == 2  # database and DNS


# === helm test ================================================================================


def test_helm_test_runs_pgcg_status_and_it_passes_against_a_migrated_database(helm, dsn):
    docs = render(helm)
    pod = named(docs, "Pod", "t-pgcg-test-status")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = container(pod)
    assert c["command"] + c["args"] == ["pgcg", "status", "--json"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}  # the DSN comes from the Secret
    result = subprocess.run(
        [sys.executable, "-m", "pgcg.shared.cli", *c["args"]],
        env={**env, "PATH": "/usr/bin:/bin", "PGCG_DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "groups" in json.loads(result.stdout)


def test_helm_test_fails_on_an_unmigrated_database(helm, empty_dsn):
    c = container(named(render(helm), "Pod", "t-pgcg-test-status"))
    result = subprocess.run(
        [sys.executable, "-m", "pgcg.shared.cli", *c["args"]],
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PGCG_DATABASE_URL": empty_dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 5, result.stderr


# === tracing ==================================================================================


def test_otlp_settings_reach_every_long_running_process(helm):
    docs = render(helm, values_file("otlp-values.yaml"))
    for deployment in of_kind(docs, "Deployment"):
        config = config_of(docs, deployment)
        assert config["OTEL_TRACES_EXPORTER"] == "otlp"
        assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
        assert config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
        assert config["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert config["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
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
    for deployment in of_kind(docs, "Deployment"):
        assert config_of(docs, deployment)["OTEL_TRACES_EXPORTER"] == "none"
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
            "groups:\n  g:\n    topic: orders\n    handler: m:f\n"
            "    settings:\n      httpPort: 1\n",
            ["/groups/g/settings", "additional properties 'httpPort' not allowed"],
            id="group-http-port",
        ),
        pytest.param(
            "settings:\n  logFormat: xml\n",
            ["/settings/logFormat", "value must be one of 'auto', 'json', 'text'"],
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
    result = run(helm, "lint", "--strict", str(CHART), "-f", str(tmp_path / "values.yaml"))
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
            (*GROUP, "groups.g.keda.enabled=true", "groups.g.keda.minReplicaCount=20"),
            "groups.g: keda.minReplicaCount (20) exceeds keda.maxReplicaCount (16)",
            id="keda-bounds",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(helm, sets, expected):
    assert expected in render_error(helm, sets=sets)


# === NOTES ====================================================================================


def notes(helm_binary: str, *values: Path | str, sets: tuple[str, ...] = ()) -> str:
    from tests.chart import value_args

    result = run(
        helm_binary, "install", "t", str(CHART), "--dry-run=client", *value_args(values, sets)
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


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


# === the image ================================================================================


def _extras_step(extras: str) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's pgcg install step, run by sh with pip replaced by an echo (no
    Docker engine here)."""
    text = (REPO / "helm" / "Dockerfile").read_text()
    block = re.search(
        r"^RUN --mount=type=bind,source=\.,target=/src,rw \\\n"
        r"(    set -eu; \\\n    IFS=.*?[^\\])\n",
        text,
        re.M | re.S,
    )
    assert block, "the RUN step that installs pgcg with PGCG_EXTRAS"
    script = block.group(1).replace("\\\n", "\n")
    return subprocess.run(
        ["sh", "-c", f'pip() {{ echo "pip $*"; }}\n{script}'],
        env={"PGCG_EXTRAS": extras, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def test_dockerfile_installs_the_extras_asked_for_and_refuses_unknown_ones():
    assert _extras_step("").stdout.strip() == "pip install --no-cache-dir /src"
    assert _extras_step("grpc,otel").stdout.strip() == "pip install --no-cache-dir /src[grpc,otel]"
    typo = _extras_step("grcp")
    assert typo.returncode == 1 and "unknown extra 'grcp'" in typo.stderr


def test_extras_known_to_the_dockerfile_and_the_chart_are_pgcgs():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"]) - {"test"}
    dockerfile = (REPO / "helm" / "Dockerfile").read_text()
    assert set(re.search(r"^\s+(\S+)\) ;; \\$", dockerfile, re.M).group(1).split("|")) == extras
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["definitions"]["image"]["properties"]["extras"]["items"]["enum"]) == extras


def test_dockerfile_labels_the_image_the_oci_way():
    dockerfile = (REPO / "helm" / "Dockerfile").read_text()
    for key in ("title", "description", "licenses", "source", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in dockerfile
    assert re.search(r"^ARG PGCG_EXTRAS=\"\"$", dockerfile, re.M)
