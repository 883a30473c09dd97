"""The chart's settings accept what pgcg accepts: the schema's settings part is generated
from the Settings model and checked in; every bound of every setting, and every rule
between settings, is tried through both the chart and Settings, which must agree."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
from pydantic import Field

from pgcg.shared.settings import Settings
from tests.chart import (
    CHART,
    REPO,
    config_of,
    consumers,
    named,
    pod_spec,
    render,
    render_error,
    renders,
    write_values,
)


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "settings_schema", REPO / "helm" / "settings_schema.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["settings_schema"] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()
SPEC: dict[str, dict[str, Any]] = gen.generate()[2]
SNAKE = {gen.camel(name): name for name in Settings.model_fields}
GROUP = {"groups": {"g": {"topic": "orders", "handler": "m:f"}}}
# An image with every extra: the bounds alone decide (the extras have tests of their own).
IMAGE = {"image": {"repository": "pgcg", "extras": ["grpc", "otel"]}}
# Other settings while one is tried at its bounds: far from every rule between settings.
BASELINE = {"heartbeatInterval": 0.5, "sessionTimeout": 3, "drainDeadline": 2, "retryBase": 1e-4}


# === generated, and in step with the model ====================================================


def test_schema_and_spec_are_generated_from_the_settings_model():
    assert gen.main(["--check"]) == 0, "run: python helm/settings_schema.py"


def test_every_setting_but_the_urls_is_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    properties = schema["definitions"]["settings"]["properties"]
    assert {SNAKE[k] for k in properties if k != "extra"} == (
        set(Settings.model_fields) - gen.NOT_IN_CHART
    )


def test_a_changed_bound_makes_the_checked_in_schema_stale(monkeypatch):
    class Stricter(Settings):
        session_timeout: float = Field(10.0, ge=4.0)

    monkeypatch.setattr(gen, "Settings", Stricter)
    assert gen.main(["--check"]) == 1


def test_a_new_setting_must_be_placed_before_it_reaches_the_chart(monkeypatch):
    class Grown(Settings):
        new_knob: int = Field(1, ge=1)

    monkeypatch.setattr(gen, "Settings", Grown)
    with pytest.raises(SystemExit, match="new_knob"):
        gen.generate()


# === each bound, through the chart and through Settings ========================================


def app_accepts(settings: dict[str, Any]) -> bool:
    try:
        Settings(**{SNAKE[k]: v for k, v in settings.items()})
    except pydantic.ValidationError:
        return False
    return True


def cases() -> list[Any]:
    """(setting, value, how): each bound, met and missed, as a number and as a string."""
    out = []
    for key, entry in SPEC.items():
        kind = entry["type"]
        values: list[Any] = []
        step = 1 if kind == "integer" else 0.5
        if "minimum" in entry:
            values += [entry["minimum"], entry["minimum"] - step]
        if "exclusiveMinimum" in entry:
            low = entry["exclusiveMinimum"]
            values += [low, low + (1 if kind == "integer" else 0.001)]
        if "maximum" in entry:
            values += [entry["maximum"], entry["maximum"] + 1]
        if kind == "enum":
            values += [*entry["enum"], *(w.lower() for w in entry["enum"]), "CRITICAL", "xml"]
        if kind == "boolean":
            values += [True, False]
        for value in values:
            out.append(pytest.param(key, value, "yaml", id=f"{key}={value}"))
            if kind == "number" and value >= 0:
                out.append(pytest.param(key, value, "set", id=f"{key}={value}-as-string"))
    return out


def _plain(value: float) -> str:
    """A number as a user types it after --set: no exponent (`:g` writes 315360000 as
    3.1536e+08, which neither the chart nor a user would)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@pytest.mark.parametrize(("key", "value", "how"), cases())
def test_each_bound_is_where_pgcg_puts_it(helm, tmp_path, key, value, how):
    settings = {**BASELINE, key: value}
    if key == "retryBase":
        settings["retryMax"] = 300
    app = app_accepts(settings)
    if how == "yaml":
        values = write_values(tmp_path, json.dumps({"settings": settings, **GROUP, **IMAGE}))
        chart = renders(helm, values)
    else:
        rest = {k: v for k, v in settings.items() if k != key}
        values = write_values(tmp_path, json.dumps({"settings": rest, **GROUP, **IMAGE}))
        chart = renders(helm, values, sets=(f"settings.{key}={_plain(value)}",))
    narrower = gen.NARROWER.get(SNAKE[key], {})
    if narrower and app and not chart:
        # Where the chart accepts less on purpose (httpPort 0 turns off the probes' port).
        assert value < narrower["minimum"]
        return
    assert chart == app, f"settings.{key}={value!r} ({how}): chart {chart}, pgcg {app}"
    if chart:
        assert_pods_start_with(
            helm, values, sets=() if how == "yaml" else (f"settings.{key}={_plain(value)}",)
        )


def assert_pods_start_with(helm: str, values: Path, sets: tuple[str, ...] = ()) -> None:
    """What the chart renders into each ConfigMap is what Settings will read: it validates."""
    docs = render(helm, values, sets=sets)
    for deployment in [named(docs, "Deployment", "t-pgcg-coordinator"), *consumers(docs).values()]:
        env = {k: v for k, v in config_of(docs, deployment).items() if k.startswith("PGCG_")}
        with pytest.MonkeyPatch.context() as mp:
            for name in list(os.environ):
                if name.startswith("PGCG_"):
                    mp.delenv(name)
            for name, value in env.items():
                mp.setenv(name, value)
            Settings()  # raises if a pod would exit 2 on these


# === rules between settings ===================================================================


def margin(session: float) -> float:
    return max(1.0, session * 0.2)


CROSS = [
    # heartbeat at most half the session timeout
    ({"sessionTimeout": 10, "heartbeatInterval": 5}, True),
    ({"sessionTimeout": 10, "heartbeatInterval": 5.01}, False),
    ({"sessionTimeout": 3, "heartbeatInterval": 1.5, "drainDeadline": 2}, True),
    # retryMax not below retryBase
    ({"retryBase": 5, "retryMax": 5}, True),
    ({"retryBase": 5, "retryMax": 4.99}, False),
    # drain deadline at least session timeout minus the lease margin
    ({"sessionTimeout": 10, "drainDeadline": 10 - margin(10)}, True),
    ({"sessionTimeout": 10, "drainDeadline": 7.99}, False),
    ({"sessionTimeout": 20, "drainDeadline": 20 - margin(20)}, True),
    ({"sessionTimeout": 20, "drainDeadline": 15.9}, False),
    ({"sessionTimeout": 3, "heartbeatInterval": 1, "drainDeadline": 2}, True),
    ({"sessionTimeout": 3, "heartbeatInterval": 1, "drainDeadline": 1.9}, False),
    ({"sessionTimeout": 12.5, "drainDeadline": 12.5 - margin(12.5)}, True),
]


@pytest.mark.parametrize(("settings", "expected"), CROSS, ids=[json.dumps(s) for s, _ in CROSS])
@pytest.mark.parametrize("where", ["top", "group"])
def test_rules_between_settings_agree_with_pgcg(helm, tmp_path, settings, expected, where):
    assert app_accepts(settings) is expected
    if where == "top":
        values = {"settings": settings, **GROUP}
    else:
        # The group's own settings, over top-level ones that are fine by themselves.
        values = {"groups": {"g": {"topic": "orders", "handler": "m:f", "settings": settings}}}
    path = write_values(tmp_path, json.dumps(values))
    assert renders(helm, path) is expected
    if expected:
        assert_pods_start_with(helm, path)


def test_a_group_rule_violation_names_the_group(helm):
    err = render_error(
        helm,
        sets=(
            "groups.g.topic=orders",
            "groups.g.handler=m:f",
            "groups.g.settings.sessionTimeout=20",
        ),
    )
    assert (
        "groups.g: settings.drainDeadline (10) must be at least settings.sessionTimeout minus "
        "the lease margin (16)" in err
    )


# === what used to crash-loop, and what used to be refused ======================================


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        pytest.param(("settings.logLevel=CRITICAL",), "/settings/logLevel", id="log-critical"),
        pytest.param(("settings.leaderTimeout=1",), "/settings/leaderTimeout", id="leader-1"),
        pytest.param(
            ("settings.leaderTimeout=1.5",),
            "settings.leaderTimeout (1.5) must be at least 2",
            id="leader-1.5-as-string",
        ),
        pytest.param(
            ("settings.sessionTimeout=2.5",),
            "settings.sessionTimeout (2.5) must be at least 3",
            id="session-2.5-as-string",
        ),
        pytest.param(
            ("settings.heartbeatInterval=6",),
            "settings.heartbeatInterval (6) must be at most half of settings.sessionTimeout (10)",
            id="heartbeat-above-half",
        ),
        pytest.param(
            ("otlp.enabled=true", "otlp.endpoint=http://c:4318", "otlp.protocol=http/json"),
            "/otlp/protocol",
            id="otlp-http-json",
        ),
        pytest.param(
            ("otlp.enabled=true", "otlp.endpoint=http://c:4317", "otlp.protocol=grpc"),
            "coordinator: otlp.protocol grpc needs the gRPC exporter, which the image "
            "pgcg:0.1.0 lacks",
            id="otlp-grpc-without-exporter",
        ),
        pytest.param(
            ("settings.instrumentPsycopg=true",),
            "settings.instrumentPsycopg needs the otel extra",
            id="instrument-without-otel",
        ),
    ],
)
def test_values_pgcg_would_refuse_at_start_are_refused_at_render(helm, sets, expected):
    assert expected in render_error(helm, sets=sets)


def test_a_fractional_drain_deadline_from_set_is_accepted(helm):
    docs = render(
        helm, sets=("settings.drainDeadline=12.5", "groups.g.topic=o", "groups.g.handler=m:f")
    )
    deployment = consumers(docs)["g"]
    assert config_of(docs, deployment)["PGCG_DRAIN_DEADLINE"] == "12.5"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] == 13 + 20


def test_grpc_and_psycopg_tracing_with_an_image_built_for_them(helm):
    sets = (
        "otlp.enabled=true",
        "otlp.endpoint=http://c:4317",
        "otlp.protocol=grpc",
        "settings.instrumentPsycopg=true",
        "image.extras={grpc,otel}",
        "groups.g.topic=o",
        "groups.g.handler=m:f",
    )
    docs = render(helm, sets=sets)
    assert config_of(docs, consumers(docs)["g"])["PGCG_INSTRUMENT_PSYCOPG"] == "true"
    # A group with an image of its own needs the extras in that image too.
    err = render_error(
        helm, sets=(*sets, "groups.g.image.repository=other", "groups.g.image.extras={otel}")
    )
    assert (
        "groups.g: otlp.protocol grpc needs the gRPC exporter, which the image other:0.1.0 lacks"
        in err
    )


def test_log_level_in_any_case_like_pgcg(helm):
    docs = render(
        helm, sets=("settings.logLevel=debug", "groups.g.topic=o", "groups.g.handler=m:f")
    )
    assert config_of(docs, consumers(docs)["g"])["PGCG_LOG_LEVEL"] == "debug"
    assert Settings(log_level="debug").log_level == "DEBUG"
