"""`pgcg status`: each group's leader, members, partitions and lag, and each topic's
storage and what holds it back, as a table or stable JSON."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgcg.shared import names
from pgcg.shared.db import translated
from pgcg.shared.errors import UnknownGroup
from pgcg.shared.migrate import check as check_schema
from pgcg.shared.queries import Queries
from pgcg.shared.units import approx_size, format_duration, format_size

Q = Queries("status")

# Reclaimed segments shown after the live ones, for context.
RECENT_RECLAIMED = 3


def _num(value: Any, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _when(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def collect(
    conn: psycopg.Connection[Any],
    group: str | None = None,
    *,
    leader_timeout: float = 10.0,
    rebalances: int = 5,
) -> dict[str, Any]:
    """The status of every group (or one) and of their topics. Raises UnknownGroup for a
    group that does not exist."""
    if group is not None:
        names.group_name(group)
    with translated():
        check_schema(conn)
        groups = conn.execute(Q.groups, {"group": group}).fetchall()
        if group is not None and not groups:
            raise UnknownGroup(
                f"unknown group {group!r}: create it with `pgcg group create {group} --topic "
                "<topic>` or start a consumer (`pgcg consumer --group ...`), or check the name "
                "with `pgcg group list`"
            )
        out = [_group(conn, g, leader_timeout, rebalances) for g in groups]
        topic = groups[0]["topic"] if group is not None else None
        topics = [_topic(conn, t) for t in conn.execute(Q.topics, {"topic": topic}).fetchall()]
    return {"groups": out, "topics": topics}


def _group(
    conn: psycopg.Connection[Any], g: dict[str, Any], leader_timeout: float, rebalances: int
) -> dict[str, Any]:
    p = {"group": g["group_name"], "topic": g["topic"], "leader_timeout_s": leader_timeout}
    leader = conn.execute(Q.leader, p).fetchone()
    members = conn.execute(Q.members, p).fetchall()
    parts = conn.execute(Q.partitions, p).fetchall()
    dead = conn.execute(Q.dead_letters, p).fetchone()
    losses = conn.execute(Q.losses, p).fetchone()
    history = conn.execute(Q.recent_rebalances, {**p, "limit": rebalances}).fetchall()
    progress = conn.execute(Q.in_flight_progress, {**p, "now": None}).fetchall()
    owned: dict[str, int] = {}
    for row in parts:
        if row["member_id"]:
            owned[row["member_id"]] = owned.get(row["member_id"], 0) + 1
    return {
        "group": g["group_name"],
        "topic": g["topic"],
        "partitions_total": g["partitions"],
        "generation": g["generation"],
        "seek_generation": g["seek_gen"],
        "leader": None
        if leader is None or leader["leader_id"] is None
        else {
            "id": leader["leader_id"],
            "epoch": leader["leader_epoch"],
            "heartbeat_age_s": _num(leader["heartbeat_age_s"]),
            "alive": bool(leader["alive"]),
        },
        "members": [
            {
                "member_id": m["member_id"],
                "host": m["host"],
                "pid": m["pid"],
                "heartbeat_age_s": _num(m["heartbeat_age_s"]),
                "session_timeout_s": _num(m["session_timeout_s"]),
                "partitions": owned.get(m["member_id"], 0),
            }
            for m in members
        ],
        "partitions": [
            {
                "partition": r["partition"],
                "owner": r["member_id"],
                "epoch": r["epoch"],
                "state": r["state"],
                "target": r["target_member_id"],
                "revoke_in_s": _num(r["revoke_in_s"]),
                "lag": r["lag"],
                "in_flight": r["in_flight"],
                "oldest_age_s": _num(r["oldest_age_s"]),
                "parked": r["parked"],
                "position_tick": r["position_tick"],
            }
            for r in parts
        ],
        "lag_total": sum(r["lag"] for r in parts),
        "in_flight_total": sum(r["in_flight"] for r in parts),
        "parked_total": sum(r["parked"] for r in parts),
        "dead_letters": dead["dead"] if dead else 0,
        "retention_lost": losses["lost"] if losses else 0,
        "progress": [
            {
                "partition": r["partition"],
                "message_id": r["message_id"],
                "key": r["key"],
                "member_id": r["member_id"],
                "epoch": r["epoch"],
                "attempt": r["attempt"],
                "percent": _num(r["percent"], 1),
                "text": r["text"],
                "reported_age_s": _num(r["reported_age_s"]),
                "deadline_in_s": _num(r["deadline_in_s"]),
                "overdue": bool(r["overdue"]),
            }
            for r in progress
        ],
        "rebalances": [
            {
                "generation": h["generation"],
                "leader_epoch": h["leader_epoch"],
                "reason": h["reason"],
                "members": h["members"],
                "moves": len(h["moves"]),
                "started_at": h["started_at"].isoformat(),
                "duration_ms": _num(h["duration_ms"], 2),
            }
            for h in history
        ],
    }


def _topic(conn: psycopg.Connection[Any], t: dict[str, Any]) -> dict[str, Any]:
    p = {"topic": t["name"], "current": t["current_segment"], "reclaimed": RECENT_RECLAIMED}
    segments = [
        {
            "seq": s["seq"],
            "slot": s["slot"],
            "state": s["state"],
            "bytes": s["bytes"],
            "created_at": _when(s["created_at"]),
            "sealed_at": _when(s["sealed_at"]),
            "reclaimed_at": _when(s["reclaimed_at"]),
            "due_in_s": _num(s["due_in_s"]),
            "ticked": bool(s["ticked"]),
        }
        for s in conn.execute(Q.segments, p).fetchall()
    ]
    stored = sum(s["bytes"] or 0 for s in segments)
    return {
        "topic": t["name"],
        "partitions": t["partitions"],
        "groups": list(t["groups"]),
        "retention": {
            "retention_ms": t["retention_ms"],
            "retention_bytes": t["retention_bytes"],
            "hard_retention_ms": t["hard_retention_ms"],
            "hard_retention_bytes": t["hard_retention_bytes"],
            "segment_bytes": t["segment_bytes"],
        },
        "segments_in_ring": t["segments"],
        "current_segment": t["current_segment"],
        "stored_bytes": stored,
        "segments": segments,
        "holding_back": _holding_back(conn, t, segments, stored),
    }


def _holding_back(
    conn: psycopg.Connection[Any], t: dict[str, Any], segments: list[dict[str, Any]], stored: int
) -> dict[str, Any] | None:
    """Why the oldest segment before the current one is still on disk, or None when the
    current segment is the only one."""
    oldest = next((s for s in segments if s["state"] in ("sealing", "sealed")), None)
    if oldest is None:
        return None
    p = {"topic": t["name"], "seq": oldest["seq"]}
    out: dict[str, Any] = {
        "segment": oldest["seq"],
        "state": oldest["state"],
        "due_in_s": oldest["due_in_s"],
        "groups": [],
        "producers": [],
    }
    if oldest["state"] == "sealing":
        out["producers"] = [
            {"pid": r["pid"], "application_name": r["application_name"],
             "xact_age_s": _num(r["xact_age_s"])}
            for r in conn.execute(Q.producers, p).fetchall()
        ]  # fmt: skip
        out["reason"] = "producers"  # an open transaction may still write into it
        return out
    by_group: dict[str, dict[str, Any]] = {}
    for r in conn.execute(Q.held, p).fetchall():
        entry = by_group.setdefault(
            r["group_name"], {"group": r["group_name"], "partitions": [], "lag": 0}
        )
        entry["partitions"].append(r["partition"])
        entry["lag"] += r["lag"]
    out["groups"] = list(by_group.values())
    over_size = t["retention_bytes"] is not None and stored > t["retention_bytes"]
    due = over_size or (oldest["due_in_s"] is not None and oldest["due_in_s"] <= 0)
    if out["groups"]:
        out["reason"] = "groups"  # unfinished messages: only a hard limit drops them
    elif not due:
        out["reason"] = "retention"  # finished, kept for replay until the retention passes
    elif not oldest["ticked"]:
        out["reason"] = "tick"  # reclaimed once a read takes a tick after its seal
    else:
        out["reason"] = "upkeep"  # free to go at the next upkeep round of a coordinator
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def render(status: dict[str, Any]) -> str:
    """A terminal table per group, then each topic's storage."""
    if not status["groups"] and not status.get("topics"):
        return "no groups yet: start a consumer with `pgcg consumer --group G --topic T ...`"
    lines: list[str] = []
    for g in status["groups"]:
        _render_group(g, lines)
    for t in status.get("topics", []):
        _render_topic(t, lines)
    return "\n".join(lines).rstrip()


def _render_group(g: dict[str, Any], lines: list[str]) -> None:
    leader = g["leader"]
    who = (
        f"{leader['id']} (epoch {leader['epoch']}, heartbeat {_age(leader['heartbeat_age_s'])}"
        f"{'' if leader['alive'] else ', SILENT'})"
        if leader
        else "none"
    )
    lines.append(
        f"group {g['group']}  topic {g['topic']}  generation {g['generation']}  leader {who}"
    )
    lost = f"  LOST to hard retention {g['retention_lost']}" if g["retention_lost"] else ""
    lines.append(
        f"  lag {g['lag_total']}  in flight {g['in_flight_total']}  parked {g['parked_total']}  "
        f"dead letters {g['dead_letters']}{lost}"
    )
    lines.append(f"  {'MEMBER':<40} {'HOST':<16} {'PID':>7} {'HEARTBEAT':>9} {'PARTS':>5}")
    for m in g["members"]:
        lines.append(
            f"  {m['member_id']:<40} {m['host'][:16]:<16} {m['pid']:>7} "
            f"{_age(m['heartbeat_age_s']):>9} {m['partitions']:>5}"
        )
    lines.append(
        f"  {'PART':>4} {'OWNER':<40} {'EPOCH':>5} {'STATE':<10} {'LAG':>7} "
        f"{'INFLIGHT':>8} {'OLDEST':>7} {'PARKED':>6}"
    )
    for p in g["partitions"]:
        state = p["state"] + (f"->{p['target'][:8]}" if p["target"] else "")
        lines.append(
            f"  {p['partition']:>4} {(p['owner'] or '-'):<40} {p['epoch']:>5} "
            f"{state:<10} {p['lag']:>7} {p['in_flight']:>8} {_age(p['oldest_age_s']):>7} "
            f"{p['parked']:>6}"
        )
    for r in g["progress"]:
        lines.append(
            f"  progress: partition {r['partition']} message {r['message_id']} "
            f"({r['member_id']}): {r['percent']}% {r['text'] or ''} "
            f"[reported {_age(r['reported_age_s'])} ago"
            f"{', OVERDUE' if r['overdue'] else ''}]"
        )
    for r in g["rebalances"]:
        lines.append(
            f"  rebalance {r['generation']} (leader epoch {r['leader_epoch']}): "
            f"{r['moves']} move(s), {r['duration_ms']} ms, {r['reason']}"
        )
    lines.append("")


def _render_topic(t: dict[str, Any], lines: list[str]) -> None:
    r = t["retention"]
    by_size = "" if r["retention_bytes"] is None else " or " + format_size(r["retention_bytes"])
    hard_size = (
        "" if r["hard_retention_bytes"] is None else " or " + format_size(r["hard_retention_bytes"])
    )
    lines.append(
        f"topic {t['topic']}  partitions {t['partitions']}  stored {approx_size(t['stored_bytes'])}"
        f"  retention {format_duration(r['retention_ms'])}"
        f"{by_size}"
        f"  hard limit {format_duration(r['hard_retention_ms'])}"
        f"{hard_size}"
        f"  groups {', '.join(t['groups']) or '-'}"
    )
    lines.append(
        f"  {'SEGMENT':>7} {'SLOT':>4} {'STATE':<10} {'SIZE':>10} {'SEALED':>8} {'DUE IN':>8}"
    )
    for s in t["segments"]:
        lines.append(
            f"  {s['seq']:>7} {s['slot']:>4} {s['state']:<10} {approx_size(s['bytes']):>10} "
            f"{'-' if s['sealed_at'] is None else 'yes':>8} "
            f"{_age(s['due_in_s']) if s['due_in_s'] is not None and s['due_in_s'] > 0 else '-':>8}"
        )
    held = t["holding_back"]
    if held is not None:
        lines.append(f"  holding storage back: {_why(held)}")
    lines.append("")


def _why(held: dict[str, Any]) -> str:
    seg = f"segment {held['segment']}"
    if held["reason"] == "producers":
        who = ", ".join(f"pid {p['pid']} (open {_age(p['xact_age_s'])})" for p in held["producers"])
        return f"{seg} is not sealed yet: producer transactions may still write into it" + (
            f": {who}" if who else ""
        )
    if held["reason"] == "groups":
        groups = "; ".join(
            f"group {g['group']} in partition(s) {', '.join(map(str, g['partitions']))} "
            f"(lag {g['lag']})"
            for g in held["groups"]
        )
        return f"{seg} has messages not finished by {groups}"
    if held["reason"] == "retention":
        return f"{seg} is kept by the retention for {_age(held['due_in_s'])} more"
    if held["reason"] == "tick":
        return (
            f"{seg} is due but waits for a tick after its seal (taken when consumers read "
            "the topic)"
        )
    return f"{seg} is free to go at the next upkeep round (is a coordinator running?)"


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True, default=str)
