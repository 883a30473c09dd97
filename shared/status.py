"""`pgcg status`: a group's leader, members, partitions and lag, as a table or stable JSON."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgcg.shared import names
from pgcg.shared.db import translated
from pgcg.shared.errors import UnknownGroup
from pgcg.shared.migrate import check as check_schema
from pgcg.shared.queries import Queries

Q = Queries("status")


def _num(value: Any, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def collect(
    conn: psycopg.Connection[Any],
    group: str | None = None,
    *,
    leader_timeout: float = 10.0,
    rebalances: int = 5,
) -> dict[str, Any]:
    """The status of every group (or one). Raises UnknownGroup for a group never joined."""
    if group is not None:
        names.group_name(group)
    with translated():
        check_schema(conn)
        groups = conn.execute(Q.groups, {"group": group}).fetchall()
        if group is not None and not groups:
            raise UnknownGroup(
                f"unknown group {group!r}: no consumer has joined it yet (start one with "
                f"`pgcg consumer --group {group} ...`), or check the name with `pgcg status`"
            )
        out = []
        for g in groups:
            p = {"group": g["group_name"], "topic": g["topic"], "leader_timeout_s": leader_timeout}
            leader = conn.execute(Q.leader, p).fetchone()
            members = conn.execute(Q.members, p).fetchall()
            parts = conn.execute(Q.partitions, p).fetchall()
            dead = conn.execute(Q.dead_letters, p).fetchone()
            history = conn.execute(Q.recent_rebalances, {**p, "limit": rebalances}).fetchall()
            progress = conn.execute(Q.in_flight_progress, {**p, "now": None}).fetchall()
            owned: dict[str, int] = {}
            for row in parts:
                if row["member_id"]:
                    owned[row["member_id"]] = owned.get(row["member_id"], 0) + 1
            out.append(
                {
                    "group": g["group_name"],
                    "topic": g["topic"],
                    "partitions_total": g["partitions"],
                    "generation": g["generation"],
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
                        }
                        for r in parts
                    ],
                    "lag_total": sum(r["lag"] for r in parts),
                    "in_flight_total": sum(r["in_flight"] for r in parts),
                    "dead_letters": dead["dead"] if dead else 0,
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
            )
    return {"groups": out}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def render(status: dict[str, Any]) -> str:
    """A terminal table per group."""
    if not status["groups"]:
        return "no groups yet: start a consumer with `pgcg consumer --group G --topic T ...`"
    lines: list[str] = []
    for g in status["groups"]:
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
        lines.append(
            f"  lag {g['lag_total']}  in flight {g['in_flight_total']}  "
            f"dead letters {g['dead_letters']}"
        )
        lines.append(f"  {'MEMBER':<40} {'HOST':<16} {'PID':>7} {'HEARTBEAT':>9} {'PARTS':>5}")
        for m in g["members"]:
            lines.append(
                f"  {m['member_id']:<40} {m['host'][:16]:<16} {m['pid']:>7} "
                f"{_age(m['heartbeat_age_s']):>9} {m['partitions']:>5}"
            )
        lines.append(
            f"  {'PART':>4} {'OWNER':<40} {'EPOCH':>5} {'STATE':<10} {'LAG':>7} "
            f"{'INFLIGHT':>8} {'OLDEST':>7}"
        )
        for p in g["partitions"]:
            state = p["state"] + (f"->{p['target'][:8]}" if p["target"] else "")
            lines.append(
                f"  {p['partition']:>4} {(p['owner'] or '-'):<40} {p['epoch']:>5} "
                f"{state:<10} {p['lag']:>7} {p['in_flight']:>8} {_age(p['oldest_age_s']):>7}"
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
    return "\n".join(lines).rstrip()


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True, default=str)
