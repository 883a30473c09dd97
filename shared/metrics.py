"""Metrics: pgcg's instruments on the OTel metrics API, and the MeterProvider behind them.

Readers: a Prometheus one rendered on /metrics when PGCG_HTTP_PORT is set (see health.py),
and an exporter from OTEL_METRICS_EXPORTER (none by default | otlp | console) pushed every
OTEL_METRIC_EXPORT_INTERVAL. Without either, the API stays a no-op and recording costs
next to nothing.

Attribute names follow the messaging semantic conventions (messaging.consumer.group.name,
messaging.destination.name, messaging.destination.partition.id); in Prometheus they read
messaging_consumer_group_name and so on. Gauges are observed at collection time from the
live objects that registered a source (a consumer, a coordinator), never by a query on
the scrape path: the consumer refreshes its lag in the background.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from pgcg.shared.errors import ConfigError
from pgcg.shared.extras import installed, require

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry

log = logging.getLogger("pgcg.metrics")
meter = metrics.get_meter("pgcg")

# Seconds: from a no-op handler to one at the visibility timeout's default scale.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60)  # fmt: skip
REBALANCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

process_duration = meter.create_histogram(
    "messaging.process.duration",
    unit="s",
    description="Duration of handler calls, by outcome (error.type set when it raised).",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
processed = meter.create_counter(
    "pgcg.messages.processed", unit="{message}", description="Messages handled and acked."
)
retried = meter.create_counter(
    "pgcg.messages.retried",
    unit="{message}",
    description="Failed deliveries scheduled for another attempt.",
)
dead_lettered = meter.create_counter(
    "pgcg.messages.dead_lettered",
    unit="{message}",
    description="Messages moved to the dead letters after their last attempt.",
)
rebalances = meter.create_counter(
    "pgcg.rebalances",
    unit="{rebalance}",
    description="Rebalances that changed something, by group and reason.",
)
rebalance_duration = meter.create_histogram(
    "pgcg.rebalance.duration",
    unit="s",
    description="Duration of the rebalance transaction on the leader.",
    explicit_bucket_boundaries_advisory=REBALANCE_BUCKETS,
)
partitions_moved = meter.create_counter(
    "pgcg.rebalance.moves",
    unit="{partition}",
    description="Partition moves decided by rebalances, by kind (assign, revoke, forced, ...).",
)

# -- gauges observed from live objects ------------------------------------------------------

Reading = tuple[float, dict[str, Any]]
Source = Callable[[], Iterable[Reading]]

_sources: dict[str, list[Source]] = defaultdict(list)
_lock = threading.Lock()


def add_source(gauge: str, source: Source) -> Callable[[], None]:
    """Report readings of `gauge` from `source`; returns the function that stops it."""
    if gauge not in GAUGES:
        raise KeyError(f"no gauge {gauge!r}: declare it in GAUGES")
    with _lock:
        _sources[gauge].append(source)

    def remove() -> None:
        with _lock:
            if source in _sources[gauge]:
                _sources[gauge].remove(source)

    return remove


def _observer(gauge: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        with _lock:
            sources = list(_sources.get(gauge, ()))
        out = []
        for source in sources:
            for value, attributes in source():
                out.append(Observation(value, attributes))
        return out

    return observe


GAUGES = {
    "pgcg.consumer.lag": ("{message}", "Messages waiting in each partition this member owns."),
    "pgcg.consumer.lag.age": ("s", "Age of the oldest waiting message of each owned partition."),
    "pgcg.consumer.partitions": ("{partition}", "Partitions owned by this member, by state."),
    "pgcg.consumer.in_flight": ("{message}", "Handler calls running now."),
    "pgcg.consumer.heartbeat.age": ("s", "Seconds since the last successful heartbeat was sent."),
    "pgcg.coordinator.leader": ("1", "1 where this coordinator leads the group, 0 on standby."),
    "pgcg.group.lag": ("{message}", "Messages waiting per partition (from the group's leader)."),
    "pgcg.group.lag.age": ("s", "Age of the oldest waiting message per partition (leader)."),
}
for _name, (_unit, _description) in GAUGES.items():
    meter.create_observable_gauge(
        _name, callbacks=[_observer(_name)], unit=_unit, description=_description
    )


# -- setup ----------------------------------------------------------------------------------


def _proxy() -> bool:
    provider = metrics.get_meter_provider()
    return type(provider).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider")


def _exporter_readers() -> list[MetricReader]:
    names = [
        n.strip().lower()
        for n in os.environ.get("OTEL_METRICS_EXPORTER", "none").split(",")
        if n.strip() and n.strip().lower() not in ("none", "prometheus")
    ]
    readers: list[MetricReader] = []
    for name in names:
        require("otel", "opentelemetry.sdk", f"OTEL_METRICS_EXPORTER={name}")
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        if name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name == "otlp":
            protocol = (
                os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol == "grpc":
                try:
                    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                        OTLPMetricExporter as GrpcMetricExporter,
                    )
                except ImportError:
                    raise ConfigError(
                        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter, which is "
                        "not installed: `pip install 'pgcg[grpc]'`, or use http/protobuf"
                    ) from None
                readers.append(PeriodicExportingMetricReader(GrpcMetricExporter()))
            elif protocol == "http/protobuf":
                require("otel", "opentelemetry.exporter.otlp.proto.http", "OTLP over http")
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            else:
                raise ConfigError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use "
                    "http/protobuf or grpc"
                )
        else:
            raise ConfigError(
                f"OTEL_METRICS_EXPORTER={name!r} is not supported: use otlp, console or none "
                "(Prometheus scraping: set PGCG_HTTP_PORT and scrape /metrics)"
            )
    return readers


def setup_metrics(
    service_name: str, *, prometheus: bool, extra_readers: Sequence[MetricReader] = ()
) -> CollectorRegistry | None:
    """Install a MeterProvider with the configured readers; returns the Prometheus registry
    to render on /metrics (None without one). If the application installed its own
    provider, pgcg's instruments report there and /metrics stays empty."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    readers: list[MetricReader] = [*extra_readers, *_exporter_readers()]
    registry = None
    if prometheus and not installed("opentelemetry.exporter.prometheus"):
        log.warning(
            "/metrics is off: it needs pgcg's 'otel' extra (pip install 'pgcg[otel]')",
            extra={"action": "metrics_unavailable"},
        )
        prometheus = False
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
    if not readers or not _proxy():
        return None
    from opentelemetry.sdk.metrics import MeterProvider

    from pgcg.shared.tracing import resource

    provider = MeterProvider(metric_readers=readers, resource=resource(service_name))
    metrics.set_meter_provider(provider)
    return registry
