"""`pgcg status` on the log storage: each topic's segments and what holds storage back
(retention, an open producer transaction, a lagging group, a missing tick), and what the
hard retention limit cost each group."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import wait_for
from tests.ops_helpers import maintain, segment_states

TOPIC = "events"


def produce(db: psycopg.Connection[Any], *keys: str) -> list[int]:
    done = enqueue_many_sync(db, TOPIC, [OutgoingMessage(k, {"k": k}) for k in keys])
    return [e.id for e in done]  # type: ignore[misc]


def status(cli: Any, dsn: str, *args: str) -> dict[str, Any]:
    result = cli(dsn, "status", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def topic_status(cli: Any, dsn: str) -> dict[str, Any]:
    (topic,) = [t for t in status(cli, dsn)["topics"] if t["topic"] == TOPIC]
    return topic  # type: ignore[no-any-return]


def create(cli: Any, dsn: str, *options: str) -> None:
    done = cli(dsn, "topic", "create", TOPIC, "--partitions", "2", "--segments", "3",
               "--segment-bytes", "1B", *options)  # fmt: skip
    assert done.exit_code == 0, done.output


def seal_first_segment(db: psycopg.Connection[Any]) -> None:
    """Upkeep rounds until segment 0 is sealed (a new segment is prepared, switched to,
    then the old one sealed: with 1-byte segments, right away)."""
    wait_for(lambda: maintain(db, TOPIC) and segment_states(db, TOPIC).get(0) == "sealed",
             10, "segment 0 sealed")  # fmt: skip


def test_segments_and_the_retention_holding_them(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    create(cli, dsn, "--retention", "2h")
    produce(db, "a", "b", "c")
    empty = topic_status(cli, dsn)
    assert [(s["seq"], s["state"]) for s in empty["segments"]] == [(0, "current")]
    assert empty["holding_back"] is None and empty["stored_bytes"] > 0
    seal_first_segment(db)
    t = topic_status(cli, dsn)
    assert t["retention"]["retention_ms"] == 7_200_000 and t["segments_in_ring"] == 3
    states = [(s["seq"], s["slot"], s["state"]) for s in t["segments"]]
    assert states[0] == (0, 0, "sealed") and (t["current_segment"], "current") in [
        (seq, state) for seq, _, state in states
    ]
    sealed = t["segments"][0]
    assert sealed["bytes"] > 0 and 7000 < sealed["due_in_s"] <= 7200
    assert t["stored_bytes"] == sum(s["bytes"] for s in t["segments"] if s["bytes"])
    held = t["holding_back"]
    assert (held["segment"], held["reason"], held["groups"]) == (0, "retention", [])
    text = cli(dsn, "status").stdout
    assert "holding storage back: segment 0 is kept by the retention for " in text
    assert "sealed" in text and "current" in text


def test_an_open_producer_transaction_holds_the_seal(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    create(cli, dsn, "--retention", "0")
    with psycopg.connect(dsn) as producer:
        enqueue_many_sync(producer, TOPIC, [OutgoingMessage("k", 1)])  # open, not committed
        pid = producer.info.backend_pid
        wait_for(lambda: [e for e in maintain(db, TOPIC) if e[0] == "switched"], 10, "switch")
        assert segment_states(db, TOPIC)[0] == "open"  # the producer may still write into it
        held = topic_status(cli, dsn)["holding_back"]
        assert (held["segment"], held["state"], held["reason"]) == (0, "sealing", "producers")
        assert [p["pid"] for p in held["producers"]] == [pid]
        assert f"pid {pid} (open " in cli(dsn, "status").stdout
        producer.commit()
    seal_first_segment(db)
    assert topic_status(cli, dsn)["holding_back"]["reason"] != "producers"


def test_a_due_segment_waits_for_a_tick(db: psycopg.Connection[Any], dsn: str, cli: Any) -> None:
    """Nobody reads the topic, so no tick after the seal exists: status says so."""
    create(cli, dsn, "--retention", "0")
    produce(db, "a")
    seal_first_segment(db)
    held = topic_status(cli, dsn)["holding_back"]
    assert (held["segment"], held["reason"]) == (0, "tick")
    db.execute("SELECT pgcg.tick_now(id) FROM pgcg.topics WHERE name = %s", (TOPIC,))
    assert topic_status(cli, dsn)["holding_back"]["reason"] == "upkeep"
    assert ("reclaimed", 0, None, None) in maintain(db, TOPIC)


def test_hard_retention_losses_show_per_group(
    db: psycopg.Connection[Any], dsn: str, cli: Any
) -> None:
    create(cli, dsn, "--retention", "0", "--hard-retention", "1ms")
    db.execute("SELECT pgcg.create_group('behind', %s)", (TOPIC,))
    ids = produce(db, "a", "b", "c")
    db.execute("SELECT pgcg.create_group('other', %s, 'latest')", (TOPIC,))  # past them
    seal_first_segment(db)
    db.execute("SELECT pgcg.tick_now(id) FROM pgcg.topics WHERE name = %s", (TOPIC,))
    events = maintain(db, TOPIC)
    assert {(e, s, g) for e, s, g, _ in events if e == "lost"} == {("lost", 0, "behind")}
    groups = {g["group"]: g for g in status(cli, dsn)["groups"]}
    assert groups["behind"]["retention_lost"] == len(ids)
    assert groups["other"]["retention_lost"] == 0
    assert f"LOST to hard retention {len(ids)}" in cli(dsn, "status", "--group", "behind").stdout


@pytest.mark.parametrize("group", [None, "billing"])
def test_json_keys_stay(db: psycopg.Connection[Any], dsn: str, cli: Any, group: str | None) -> None:
    """Scripts read these keys: extended, never renamed."""
    create(cli, dsn)
    db.execute("SELECT pgcg.create_group('billing', %s)", (TOPIC,))
    got = status(cli, dsn, *(["--group", group] if group else []))
    (g,) = got["groups"]
    assert set(g) >= {
        "group", "topic", "partitions_total", "generation", "leader", "members", "partitions",
        "lag_total", "in_flight_total", "dead_letters", "progress", "rebalances",
        "parked_total", "retention_lost",
    }  # fmt: skip
    assert set(g["partitions"][0]) >= {
        "partition", "owner", "epoch", "state", "target", "revoke_in_s", "lag", "in_flight",
        "oldest_age_s", "parked",
    }  # fmt: skip
    (t,) = got["topics"]
    assert set(t) >= {"topic", "partitions", "groups", "retention", "segments", "stored_bytes",
                      "holding_back"}  # fmt: skip
