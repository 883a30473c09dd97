"""Traces across real processes, received by a real OTLP/HTTP endpoint in this process:
one trace runs from a web app's request through `pgcg consumer` processes to the handler,
and a forced rebalance (a consumer SIGKILLed) emits its span from the coordinator. The
consumer's HTTP endpoint answers probes and scrapes meanwhile."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcg.bench.chaos import journal
from pgcg.bench.cluster import Cluster
from tests.helpers import FAST_ENV, owners, wait_for
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.slow

GROUP = "billing"
TOPIC = "orders"
HANDLER = "pgcg.bench.chaos.journal:record"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_one_trace_across_processes_and_a_forced_rebalance_span(
    db: psycopg.Connection[Any], dsn: str, tmp_path: Path
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 8)", (TOPIC,))
    journal.create(db)
    with OtlpReceiver() as receiver:
        otel = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        env = {
            **FAST_ENV,
            **otel,
        }
        port = free_port()
        with Cluster(dsn, tmp_path, env=env) as cluster:
            coordinator = cluster.coordinator(name="coord")
            c1 = cluster.consumer(GROUP, TOPIC, HANDLER, "--http-port", str(port), name="c1")
            c2 = cluster.consumer(GROUP, TOPIC, HANDLER, name="c2")

            def split() -> bool:
                members = {cluster.member_id(c1), cluster.member_id(c2)}
                load: dict[str | None, int] = {}
                for member, _, state in owners(db, GROUP).values():
                    if state == "assigned":
                        load[member] = load.get(member, 0) + 1
                return None not in members and load == {m: 4 for m in members}

            wait_for(split, 30, "4/4 over two consumer processes")
            base = f"http://127.0.0.1:{port}"
            assert http_get(f"{base}/healthz")[0] == 200

            def c1_ready() -> bool:
                status, body = http_get(f"{base}/readyz")
                return status == 200 and f"of group {GROUP}, 4 partition(s)" in body

            wait_for(c1_ready, 10, "c1 ready on /readyz, holding its 4 partitions")

            # A request in another process enqueues 16 messages (over all 8 partitions).
            app = subprocess.run(
                [sys.executable, "-m", "tests.web_app", dsn, TOPIC, "16"],
                env={**os.environ, **otel, "OTEL_SERVICE_NAME": "web-app"},
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            trace_id = app.stdout.strip()
            wait_for(
                lambda: len(receiver.find(f"process {TOPIC}", trace_id=trace_id)) == 16,
                20,
                "16 process spans in the request's trace",
            )
            (request,) = receiver.find("POST /orders", trace_id=trace_id)
            (send,) = receiver.find(f"send {TOPIC}", trace_id=trace_id)
            assert request["service"] == send["service"] == "web-app"
            assert send["kind"] == "producer" and send["parent_span_id"] == request["span_id"]
            processed = receiver.find(f"process {TOPIC}", trace_id=trace_id)
            consumer_pids = {c1.pid, c2.pid}
            assert {s["pid"] for s in processed} == consumer_pids, "both consumers, one trace"
            assert {s["service"] for s in processed} == {"pgcg-consumer"}
            for span in processed:
                assert span["kind"] == "consumer"
                assert span["parent_span_id"] == send["span_id"]
                assert span["links"] == [(trace_id, send["span_id"])]
                assert span["attributes"]["messaging.consumer.group.name"] == GROUP
                assert span["attributes"]["messaging.system"] == "pgcg"
            status, text = http_get(f"{base}/metrics")
            assert status == 200
            assert f'pgcg_messages_processed_total{{messaging_consumer_group_name="{GROUP}"' in text
            assert "messaging_process_duration_seconds_bucket" in text

            (election,) = receiver.find("pgcg leader election", pid=coordinator.pid)
            assert election["attributes"]["messaging.consumer.group.name"] == GROUP

            # SIGKILL c2: once its session expires, the leader forces its partitions over.
            victim = cluster.member_id(c2)
            c2.kill()

            def forced() -> list[dict[str, Any]]:
                return [
                    s
                    for s in receiver.find("pgcg rebalance", pid=coordinator.pid)
                    if s["attributes"].get("pgcg.moves.forced")
                ]

            (rebalance,) = wait_for(forced, 20, "a forced rebalance span")
            attrs = rebalance["attributes"]
            assert rebalance["service"] == "pgcg-coordinator"
            assert attrs["messaging.consumer.group.name"] == GROUP
            assert attrs["messaging.destination.name"] == TOPIC
            assert attrs["pgcg.expired"] == [victim]
            assert attrs["pgcg.moves.forced"] == 4
            assert attrs["pgcg.members"] == [cluster.member_id(c1)]
            assert all(f":{victim}->" in m and m.endswith("(forced)") for m in attrs["pgcg.moves"])
            assert "expired 1 member(s)" in attrs["pgcg.reason"]
            assert attrs["pgcg.leader_epoch"] >= 1 and attrs["pgcg.generation"] >= 2
            assert rebalance["events"].count("move") == 4
            # ... and the survivor's side: each forced partition assigned to it, a span each
            # (spans leave in batches, so wait; earlier churn may have added more).
            taken = {m.split(":", 1)[0] for m in attrs["pgcg.moves"]}

            def assigned_to_c1() -> set[str]:
                spans = receiver.find("pgcg partition assign", pid=c1.pid)
                return {str(s["attributes"].get("messaging.destination.partition.id"))
                        for s in spans}  # fmt: skip

            wait_for(lambda: taken <= assigned_to_c1(), 20, "c1's spans for the forced partitions")
