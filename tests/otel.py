"""One in-process OpenTelemetry setup for the test session: spans into an in-memory
exporter, metrics into an in-memory reader and a Prometheus registry (what /metrics
renders). OTel providers can be installed once per process, so every test module that
needs them shares this one; tests tell their data apart by group and topic names."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from pgcg.shared import tracing
from pgcg.shared.metrics import setup_metrics
from pgcg.shared.tracing import resource


@dataclass(frozen=True)
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    registry: CollectorRegistry

    def finished(self, name: str | None = None, **attributes: Any) -> list[ReadableSpan]:
        """Finished spans named `name` whose attributes include `attributes`."""
        return [
            s
            for s in self.spans.get_finished_spans()
            if (name is None or s.name == name)
            and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
        ]

    def points(self, metric: str, **attributes: Any) -> list[Any]:
        """Current data points of `metric` whose attributes include `attributes`."""
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != metric:
                        continue
                    for p in m.data.data_points:
                        if all(p.attributes.get(k) == v for k, v in attributes.items()):
                            out.append(p)
        return out

    def total(self, metric: str, **attributes: Any) -> float:
        return sum(p.value for p in self.points(metric, **attributes))


@functools.cache
def install() -> Otel:
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=resource("pgcg-tests"))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    tracing.recheck()
    reader = InMemoryMetricReader()
    registry = setup_metrics("pgcg-tests", prometheus=True, extra_readers=[reader])
    assert registry is not None, "a MeterProvider was installed before the tests' own"
    return Otel(spans, reader, registry)


def ids(spans: Iterable[ReadableSpan]) -> set[str]:
    return {format(s.context.trace_id, "032x") for s in spans}
