"""The chart's settings, generated from pgcg's own Settings model (shared/settings.py).

Writes two files of helm/pgcg, both checked in:
  values.schema.json       definitions.settings and definitions.groupSettings (the rest of
                           the schema is written by hand and left alone)
  templates/_settings.tpl  "pgcg.settingsSpec": each setting's variable, type, bounds,
                           default and which workloads read it, for the templates' checks
                           (values given as strings, which JSON schema cannot bound) and
                           for rendering each workload's ConfigMap

    python helm/settings_schema.py          # regenerate
    python helm/settings_schema.py --check  # exit 1 if either file is out of date

tests/test_helm.py runs the check, so a new or changed setting cannot reach the chart
without it. Rules between settings (heartbeat vs session timeout, ...) are in the model's
validator, which JSON schema cannot express: the chart checks them in pgcg.validate.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo

from pgcg.shared.settings import Settings

CHART = Path(__file__).resolve().parent / "pgcg"
SCHEMA = CHART / "values.schema.json"
SPEC = CHART / "templates" / "_settings.tpl"

# Which processes read each setting. A new Settings field fails generation until it is
# placed here: the chart renders a setting only into the ConfigMaps of workloads that
# read it, so changing it rolls only those. database_url comes from a Secret instead.
READERS: dict[str, tuple[str, ...]] = {
    "heartbeat_interval": ("consumer", "coordinator"),
    "session_timeout": ("consumer", "coordinator"),
    "drain_deadline": ("consumer", "coordinator"),
    "leader_timeout": ("coordinator",),
    "rebalance_interval": ("coordinator",),
    "concurrency": ("consumer",),
    "max_attempts": ("consumer",),
    "retry_base": ("consumer",),
    "retry_max": ("consumer",),
    "visibility_timeout": ("consumer",),
    "max_payload_bytes": ("consumer",),
    "prefetch": ("consumer",),
    "prefetch_bytes": ("consumer",),
    "park_after": ("consumer",),
    "poll_interval": ("consumer",),
    "maintenance_interval": ("coordinator",),
    "listen": ("consumer",),
    "pooler": ("consumer", "coordinator"),
    "http_port": ("consumer", "coordinator"),
    "instrument_psycopg": ("consumer", "coordinator"),
    "log_format": ("consumer", "coordinator"),
    "log_level": ("consumer", "coordinator"),
}
# URLs come from Secrets (databaseUrl / sessionDatabaseUrl), never from the settings map.
NOT_IN_CHART = {"database_url", "session_database_url"}
# Consumer settings a group may not set for itself: the probes, the metrics Service and
# the NetworkPolicy address every pod on one port.
NOT_PER_GROUP = {"http_port"}
# Where the chart accepts less than the application, and why.
NARROWER: dict[str, dict[str, Any]] = {
    "http_port": {"minimum": 1},  # 0 turns the endpoint off; probes and metrics need it
}
# A number may also come as a string: `--set settings.drainDeadline=12.5` reaches the
# schema as "12.5" (Helm types only whole numbers). The templates check its bounds.
NUMBER_STRING = r"^[0-9]+(\.[0-9]+)?$"


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _bounds(field: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            out["exclusiveMinimum"] = item.gt
        elif isinstance(item, annotated_types.Ge):
            out["minimum"] = item.ge
        elif isinstance(item, annotated_types.Lt):
            out["exclusiveMaximum"] = item.lt
        elif isinstance(item, annotated_types.Le):
            out["maximum"] = item.le
        else:
            raise SystemExit(f"no JSON schema rule for constraint {item!r}: extend {__file__}")
    return out


def _case_insensitive(words: list[str]) -> str:
    """A pattern matching each word in any case (the model upper-cases before checking)."""
    alternatives = (
        "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word) for word in words
    )
    return "^(" + "|".join(alternatives) + ")$"


def _uppercased() -> set[str]:
    """Fields the model upper-cases before checking them (its `_upper` validator)."""
    validators = Settings.__pydantic_decorators__.field_validators
    return set(validators["_upper"].info.fields) if "_upper" in validators else set()


def _number(value: Any) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def describe(name: str, field: FieldInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON schema of one setting, and its entry in pgcg.settingsSpec."""
    env = f"PGCG_{name.upper()}"
    annotation = field.annotation
    bounds = {k: _number(v) for k, v in _bounds(field).items()}
    bounds.update(NARROWER.get(name, {}))
    spec: dict[str, Any] = {"env": env, "readers": list(READERS[name])}
    if annotation is bool:
        schema: dict[str, Any] = {"type": "boolean"}
        spec["type"] = "boolean"
    elif annotation is int:
        schema = {"type": "integer", **bounds}
        spec.update(type="integer", **bounds)
    elif annotation is float:
        if any(v < 0 for v in bounds.values()):
            raise SystemExit(f"{name}: negative bounds need a NUMBER_STRING with a sign")
        schema = {"type": ["number", "string"], "pattern": NUMBER_STRING, **bounds}
        spec.update(type="number", **bounds)
    elif typing.get_origin(annotation) is typing.Literal:
        words = [str(w) for w in typing.get_args(annotation)]
        if name in _uppercased():
            schema = {"type": "string", "pattern": _case_insensitive(words)}
        else:
            schema = {"enum": words}
        spec.update(type="enum", enum=words)
    else:
        raise SystemExit(f"{name}: no JSON schema for {annotation!r}: extend {__file__}")
    default = field.default
    spec["default"] = default
    text = (field.description or "").rstrip(".")
    allowed = ", ".join(f"`{w}`" for w in spec.get("enum", []))
    schema = {
        "description": " ".join(
            part
            for part in (
                f"{env}." if not text else f"{env}: {text}.",
                f"One of {allowed} (any case)." if name in _uppercased() else "",
                f"pgcg's default: {json.dumps(default)}.",
            )
            if part
        ),
        **schema,
    }
    return schema, spec


def _check_model_is_covered() -> None:
    fields = set(Settings.model_fields) - NOT_IN_CHART
    unplaced = sorted(fields - set(READERS))
    gone = sorted(set(READERS) - fields)
    if unplaced or gone:
        raise SystemExit(
            f"settings not placed in READERS: {unplaced}; in READERS but not in Settings: "
            f"{gone}. Edit READERS in {__file__}."
        )


def generate() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(definitions.settings, definitions.groupSettings, the settings spec)."""
    _check_model_is_covered()
    properties: dict[str, Any] = {}
    per_group: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        if name in NOT_IN_CHART:
            continue
        schema, entry = describe(name, field)
        key = camel(name)
        properties[key] = schema
        entry["perGroup"] = "consumer" in READERS[name] and name not in NOT_PER_GROUP
        if entry["perGroup"]:
            per_group[key] = schema
        spec[key] = entry
    reserved = sorted(["PGCG_DATABASE_URL", *(entry["env"] for entry in spec.values())])
    extra = {
        "type": "object",
        "description": "More environment variables for the ConfigMap(s), e.g. for the "
        "handler. Not PGCG_DATABASE_URL (it comes from database.*) nor a variable of a "
        "setting above (use the setting, which the chart checks).",
        "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        # `false`: the error then names the path of the refused key.
        "properties": dict.fromkeys(reserved, False),
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    }
    settings = {
        "type": "object",
        "description": "pgcg settings, as PGCG_* variables in each workload's ConfigMap. "
        "Generated from pgcg's Settings model by helm/settings_schema.py.",
        "additionalProperties": False,
        "properties": {**properties, "extra": extra},
    }
    group_settings = {
        "type": "object",
        "description": "Settings of one group's consumers, merged key by key over the "
        "top-level settings. Generated by helm/settings_schema.py.",
        "additionalProperties": False,
        "properties": {**per_group, "extra": extra},
    }
    return settings, group_settings, spec


def render_schema(settings: dict[str, Any], group_settings: dict[str, Any]) -> str:
    schema = json.loads(SCHEMA.read_text())
    schema.setdefault("definitions", {})
    schema["definitions"]["settings"] = settings
    schema["definitions"]["groupSettings"] = group_settings
    return json.dumps(schema, indent=2) + "\n"


def render_spec(spec: dict[str, Any]) -> str:
    lines = [
        "{{/*",
        "GENERATED by helm/settings_schema.py from pgcg's Settings model: do not edit.",
        "Each chart setting: its variable, type, bounds, pgcg's default, the workloads",
        "that read it, and whether a group may set it for itself. Read with fromYaml.",
        "*/}}",
        '{{- define "pgcg.settingsSpec" -}}',
    ]
    for key, entry in spec.items():
        lines.append(f"{key}:")
        for k, v in entry.items():
            lines.append(f"  {k}: {json.dumps(v)}")
    lines.append("{{- end }}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    settings, group_settings, spec = generate()
    wanted = {SCHEMA: render_schema(settings, group_settings), SPEC: render_spec(spec)}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python {__file__}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
