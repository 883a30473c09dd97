"""`pgcg topic ...`, `pgcg group ...` and `pgcg roles`: what an operator creates, changes,
moves and grants."""

from __future__ import annotations

import json
from typing import Any

import click

from pgcg.shared.cli_support import run_cli, table, with_settings
from pgcg.shared.errors import InvalidInput
from pgcg.shared.groups import POSITION_HELP
from pgcg.shared.settings import Settings
from pgcg.shared.units import DURATION_HELP, SIZE_HELP, approx_size, format_duration, format_size

CONNECTION = ("database_url", "log_level", "log_format")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


# -- topics -------------------------------------------------------------------------------


@click.group()
def topic() -> None:
    """Create, change and list topics.

    \b
    Example:
      pgcg topic create orders --partitions 16 --retention 7d
    """


def _retention_options(fn: Any) -> Any:
    for decorator in reversed(
        [
            click.option("--retention", metavar="DURATION",
                         help="Keep finished messages this long, for replay and for groups "
                         f"created later ({DURATION_HELP}). [default: 1d]"),
            click.option("--retention-bytes", metavar="SIZE",
                         help="Past this log size, the oldest segments no group needs go "
                         f"sooner ({SIZE_HELP}; none clears it). [default: none]"),
            click.option("--hard-retention", metavar="DURATION",
                         help="Drop the oldest segment past this age even if a group has not "
                         "finished it; each group's loss is counted and logged (none clears "
                         "it). [default: none]"),
            click.option("--hard-retention-bytes", metavar="SIZE",
                         help="The same past this log size (none clears it). [default: none]"),
            click.option("--segment-bytes", metavar="SIZE",
                         help="Start a new segment once the current one is this big. "
                         "[default: 1GB]"),
            click.option("--dedup-window", metavar="DURATION",
                         help="How long a (key, dedup key) pair is remembered. [default: 5m]"),
        ]
    ):  # fmt: skip
        fn = decorator(fn)
    return fn


def _parse_retention(options: dict[str, Any]) -> Any:
    from pgcg.shared.topics import Retention

    return Retention.parse(**options)


def _describe(row: dict[str, Any]) -> str:
    return (
        f"retention {format_duration(row['retention_ms'])}, "
        f"retention bytes {format_size(row['retention_bytes'])}, "
        f"hard retention {format_duration(row['hard_retention_ms'])}, "
        f"hard retention bytes {format_size(row['hard_retention_bytes'])}, "
        f"segment bytes {format_size(row['segment_bytes'])}, "
        f"dedup window {format_duration(row['dedup_window_ms'])}"
    )


@topic.command("create")
@click.argument("name")
@click.option("--partitions", type=int, default=16, show_default=True,
              help="Fixed for the topic's lifetime.")  # fmt: skip
@click.option("--segments", type=int, default=8, show_default=True,
              help="Segments in the log's ring (3-64), fixed for the topic's lifetime: "
              "space comes back a whole segment at a time.")  # fmt: skip
@_retention_options
@click.option("--if-not-exists", is_flag=True, help="Succeed if it exists with this count.")
@with_settings(*CONNECTION)
@run_cli
def topic_create(
    name: str, partitions: int, segments: int, if_not_exists: bool, settings: Settings,
    **options: Any,
) -> None:  # fmt: skip
    """Create topic NAME: its partitions and the ring of segments its log lives in.

    \b
    Examples:
      pgcg topic create orders --partitions 32
      pgcg topic create events --retention 7d --retention-bytes 50GB --hard-retention 30d
    """
    from pgcg.shared import topics
    from pgcg.shared.db import connect_sync

    retention = _parse_retention(options)  # every value checked before anything is written
    with connect_sync(settings.dsn()) as conn:
        created = topics.create(conn, name, partitions, segments, retention)
    if not created and not if_not_exists:
        raise InvalidInput(f"topic {name!r} already exists (pass --if-not-exists to accept)")
    if created:
        click.echo(f"topic {name} created ({partitions} partitions, {segments} segments)")
    else:
        unchanged = "" if retention.empty else "; settings unchanged: use `pgcg topic alter`"
        click.echo(f"topic {name} exists ({partitions} partitions{unchanged})")


@topic.command("alter")
@click.argument("name")
@_retention_options
@click.option("--partitions", hidden=True)
@click.option("--segments", hidden=True)
@with_settings(*CONNECTION)
@run_cli
def topic_alter(
    name: str, partitions: str | None, segments: str | None, settings: Settings, **options: Any
) -> None:
    """Change the retention and limits of topic NAME; what is not given stays as it is.

    \b
    Examples:
      pgcg topic alter orders --retention 3d
      pgcg topic alter orders --hard-retention none     # never drop unfinished messages
    Takes effect at the next upkeep round of any coordinator (every few seconds).
    """
    from pgcg.shared import topics
    from pgcg.shared.db import connect_sync

    for flag, given in (("--partitions", partitions), ("--segments", segments)):
        if given is not None:
            raise InvalidInput(f"{flag} is fixed when a topic is created and cannot be altered")
    retention = _parse_retention(options)
    with connect_sync(settings.dsn()) as conn:
        row = topics.alter(conn, name, retention)
    click.echo(f"topic {name}: {_describe(row)}")


@topic.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@with_settings(*CONNECTION)
@run_cli
def topic_list(as_json: bool, settings: Settings) -> None:
    """List topics: partitions, segments, retention, groups and the log's size on disk.

    \b
    Example:
      pgcg topic list
    """
    from pgcg.shared import topics
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        rows = topics.list_topics(conn)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    click.echo(
        table(
            ["TOPIC", "PARTITIONS", "SEGMENTS", "RETENTION", "RETENTION-BYTES", "HARD-RETENTION",
             "HARD-RETENTION-BYTES", "GROUPS", "STORED"],
            [
                [r["name"], r["partitions"], r["segments"], format_duration(r["retention_ms"]),
                 format_size(r["retention_bytes"]), format_duration(r["hard_retention_ms"]),
                 format_size(r["hard_retention_bytes"]), r["groups"],
                 approx_size(r["stored_bytes"])]
                for r in rows
            ],
            right="lrrllllrr",
        )
    )  # fmt: skip


# -- groups -------------------------------------------------------------------------------


@click.group()
def group() -> None:
    """Create, list, delete and move consumer groups. Every group gets every message of its
    topic, at its own pace.

    \b
    Example:
      pgcg group create audit --topic orders --from latest
    """


@group.command("create")
@click.argument("name")
@click.option("--topic", "topic_", required=True, help="The topic the group consumes.")
@click.option("--from", "start", default="earliest", show_default=True,
              help=f"Where it starts: {POSITION_HELP}.")  # fmt: skip
@click.option("--if-not-exists", is_flag=True, help="Succeed if it exists on this topic.")
@with_settings(*CONNECTION)
@run_cli
def group_create(
    name: str, topic_: str, start: str, if_not_exists: bool, settings: Settings
) -> None:
    """Create group NAME on a topic, positioned where it should start.

    \b
    A group that a consumer joins before it was created starts at the earliest retained
    message. Examples:
      pgcg group create billing --topic orders
      pgcg group create audit --topic orders --from latest
      pgcg group create replay --topic orders --from 2026-03-01T00:00:00Z
    """
    from pgcg.shared import groups
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        created = groups.create(conn, name, topic_, start)
    if not created and not if_not_exists:
        raise InvalidInput(f"group {name!r} already exists (pass --if-not-exists to accept)")
    click.echo(
        f"group {name} {'created' if created else 'exists'} on topic {topic_}"
        + (f", from {start}" if created else "")
    )


@group.command("list")
@click.option("--topic", "topic_", help="Only the groups of this topic.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@with_settings(*CONNECTION)
@run_cli
def group_list(topic_: str | None, as_json: bool, settings: Settings) -> None:
    """List groups: topic, live members, lag (messages after the group's position) and the
    age of the oldest of them.

    \b
    Example:
      pgcg group list --topic orders
    """
    from pgcg.shared import groups
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        rows = groups.list_groups(conn, topic_)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, default=str))
        return
    click.echo(
        table(
            ["GROUP", "TOPIC", "MEMBERS", "LAG", "OLDEST", "PARKED"],
            [[r["group_name"], r["topic"], r["members"], r["lag"], _age(r["oldest_age_s"]),
              r["parked"]] for r in rows],
            right="llrrrr",
        )
    )  # fmt: skip


@group.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also if consumers are running (they are expelled).")
@with_settings(*CONNECTION)
@run_cli
def group_delete(name: str, force: bool, settings: Settings) -> None:
    """Delete group NAME: its positions, parked messages and assignments. What only it was
    holding back in the topic's log is reclaimed at the next upkeep round.

    \b
    Example:
      pgcg group delete audit
    """
    from pgcg.shared import groups
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        left = groups.delete(conn, name, force=force)
    note = f"; its {left} dead letter(s) stay until `pgcg dlq purge --group {name}`" if left else ""
    click.echo(f"group {name} deleted{note}")


@group.command("seek")
@click.argument("name")
@click.option("--to", "to", required=True,
              help=f"{POSITION_HELP}, or <partition>:<id> to resume that partition with "
              "that message.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The result per partition as JSON.")
@with_settings(*CONNECTION)
@run_cli
def group_seek(name: str, to: str, as_json: bool, settings: Settings) -> None:
    """Move group NAME's position (Kafka's reset-offsets). Safe while its consumers run.

    \b
    The group's owners drop the moved partitions and adopt them again at the new position
    (the change is fenced like any change of ownership); the group's parked messages there
    are dropped (read again from the log, or skipped). Examples:
      pgcg group seek billing --to earliest         # handle everything retained again
      pgcg group seek billing --to latest           # skip the backlog
      pgcg group seek billing --to 2026-03-01T12:00:00Z
      pgcg group seek billing --to 3:52227          # partition 3, from message 52227 on
    """
    from pgcg.shared import groups, tracing
    from pgcg.shared.db import connect_sync

    tracing.setup_tracing("pgcg-cli")  # OTEL_TRACES_EXPORTER: one `pgcg group seek` span
    with connect_sync(settings.dsn()) as conn:
        result = groups.seek(conn, name, to)
    if as_json:
        click.echo(
            json.dumps(
                {"group": result.group, "topic": result.topic, "to": result.to,
                 "partitions": result.partitions, "lag": result.lag, "dropped": result.dropped}
            )
        )  # fmt: skip
        return
    click.echo(
        f"group {name} moved to {result.to} in {len(result.partitions)} partition(s): "
        f"{result.lag} message(s) to read, {result.dropped} parked message(s) dropped"
    )


# -- roles --------------------------------------------------------------------------------


@click.command("roles")
@click.argument("kind", type=click.Choice(["producer", "consumer", "coordinator", "admin",
                                           "migrator"]))  # fmt: skip
@click.argument("role")
@click.option("--topic", "topics", multiple=True, metavar="TOPIC",
              help="A producer's topics (repeatable); the topic a consumer's groups read. "
              "'*' for any.")  # fmt: skip
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="GROUP",
    help="A consumer's groups (repeatable); '*' for any.",
)
@click.option(
    "--apply",
    "run",
    is_flag=True,
    help="Run the statements (in one transaction) instead of printing them.",
)
@with_settings(*CONNECTION)
@run_cli
def roles(
    kind: str, role: str, topics: tuple[str, ...], groups: tuple[str, ...], run: bool,
    settings: Settings,
) -> None:  # fmt: skip
    """Grant ROLE what a KIND of pgcg process needs, and nothing more.

    \b
    Prints the SQL (review it, or pass --apply to run it as the connected role, which must
    own the pgcg schema or be a superuser). ROLE is created without LOGIN if it does not
    exist: grant it to login roles, or ALTER ROLE ... LOGIN. Producers and consumers get no
    privilege on any table: they call pgcg's functions, which act only for the topics and
    groups bound here (docs/security.md). Examples:
      pgcg roles producer shop --topic orders
      pgcg roles consumer billing --group billing --topic orders
      pgcg roles coordinator pgcg_coordinator
      pgcg roles admin pgcg_admin
      pgcg roles migrator pgcg_owner
    """
    from pgcg.shared import roles as grants
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        statements = grants.plan(conn, kind, role, topics=topics, groups=groups)
        if run:
            grants.apply(conn, statements)
    if run:
        click.echo(f"role {role}: {len(statements)} statement(s) applied for a {kind}")
        return
    for s in statements:
        click.echo(s.text)
