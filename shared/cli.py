"""The `pgcg` command. Every Settings field is also a flag (--session-timeout, ...), taken
from the one Settings class so flags, environment variables and defaults never drift.

Exit codes: 0 ok; 1 failure (e.g. a demo or chaos check found a violation); 2 bad
usage or input; 3 unknown topic or group; 4 database unreachable; 5 schema not migrated.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

import click

from pgcg.shared.cli_support import F, OneLineErrors, run_cli, with_settings
from pgcg.shared.errors import InvalidInput
from pgcg.shared.settings import Settings
from pgcg.shared.terminal import printable, printable_values


@click.group(
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Every flag has an environment variable (PGCG_<NAME>); see README.md.",
)
@click.version_option(package_name="pgcg")
def main() -> None:
    """pgcg: consumer groups on PostgreSQL.

    \b
    Quick start:
      pgcg demo                       # throwaway PostgreSQL, coordinators, consumers, faults
      pgcg migrate                    # create/upgrade the schema in PGCG_DATABASE_URL
      pgcg topic create orders        # 16 partitions
      pgcg consumer --group billing --topic orders --handler myapp.handlers:handle
      pgcg coordinator                # run two or more
      pgcg status --watch
    """


# -- schema ---------------------------------------------------------------------------


@main.command()
@with_settings("database_url", "log_level", "log_format")
@run_cli
def migrate(settings: Settings) -> None:
    """Create or upgrade the pgcg schema. Safe to run from many pods at once.

    \b
    Example:
      PGCG_DATABASE_URL=postgresql://app@db/app pgcg migrate
    """
    from pgcg.shared.migrate import migrate as apply

    applied = apply(settings.dsn())
    if applied:
        click.echo("applied " + ", ".join(f"{m.version:04d}_{m.name}" for m in applied))
    else:
        click.echo("schema is up to date")


# -- producing ----------------------------------------------------------------------------


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where} is not valid JSON: {exc}") from None


@main.command()
@click.option("--topic", "topic_", required=True, help="Topic to enqueue into.")
@click.option("--key", help="Ordering key (single-message mode).")
@click.option("--payload", help="JSON payload (single-message mode).")
@click.option("--header", "headers", multiple=True, help="name=value, repeatable.")
@click.option("--dedup-key",
              help="Skip if this key and dedup key were enqueued within the topic's dedup "
              "window (5 minutes unless `pgcg topic alter --dedup-window` says).")  # fmt: skip
@click.option("--delay", type=float, default=0.0, help="Seconds before it may be handled.")
@click.option("--batch-size", type=int, default=1000, show_default=True,
              help="Messages per statement when reading JSON lines.")  # fmt: skip
@with_settings("database_url", "pooler", "max_payload_bytes", "log_level", "log_format")
@run_cli
def produce(
    topic_: str,
    key: str | None,
    payload: str | None,
    headers: tuple[str, ...],
    dedup_key: str | None,
    delay: float,
    batch_size: int,
    settings: Settings,
) -> None:
    """Enqueue one message, or JSON lines from stdin.

    \b
    Example, one message:
      pgcg produce --topic orders --key customer-42 --payload '{"total": 10}'
    JSON lines ({"key": ..., "payload": ..., "headers": {}, "dedup_key": ..., "delay": 0}):
      cat orders.jsonl | pgcg produce --topic orders
    A bad line stops the run: nothing of its batch is written, earlier batches are.
    """
    from pgcg.shared import pooler
    from pgcg.shared.db import connect_sync
    from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
    from pgcg.shared.tracing import setup_tracing

    setup_tracing("pgcg-producer")  # OTEL_TRACES_EXPORTER: a `send <topic>` span per batch

    def header_map(items: tuple[str, ...]) -> dict[str, str]:
        out = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise InvalidInput(f"--header {item!r} must look like name=value")
            out[name] = value
        return out

    dsn = settings.dsn()
    if key is not None or payload is not None:
        if key is None or payload is None:
            raise InvalidInput("single-message mode needs both --key and --payload")
        msg = OutgoingMessage(
            key, _parse_json(payload, "--payload"), header_map(headers), dedup_key, delay
        )
        with connect_sync(dsn) as conn:
            (done,) = enqueue_many_sync(
                conn, topic_, [msg], max_payload_bytes=settings.max_payload_bytes
            )
        click.echo(json.dumps({"id": done.id, "partition": done.partition}))
        return

    total = 0
    batch: list[OutgoingMessage] = []
    with connect_sync(dsn) as conn:
        pooler.adjust(conn, settings)  # one statement many times: prepared, unless pooled

        def flush() -> None:
            nonlocal total
            if batch:
                enqueue_many_sync(conn, topic_, batch, max_payload_bytes=settings.max_payload_bytes)
                total += len(batch)
                batch.clear()

        for n, line in enumerate(sys.stdin, start=1):
            if not line.strip():
                continue
            doc = _parse_json(line, f"line {n}")
            if not isinstance(doc, dict) or "key" not in doc or "payload" not in doc:
                raise InvalidInput(f"line {n}: expected an object with 'key' and 'payload'")
            try:
                delay = float(doc.get("delay") or 0)
            except (TypeError, ValueError):
                raise InvalidInput(f"line {n}: delay must be a number of seconds") from None
            batch.append(
                OutgoingMessage(
                    doc["key"], doc["payload"], doc.get("headers") or {},
                    doc.get("dedup_key"), delay,
                )
            )  # fmt: skip
            if len(batch) >= batch_size:
                flush()
        flush()
    click.echo(json.dumps({"enqueued": total}))


# -- consuming ----------------------------------------------------------------------------


@main.command()
@click.option("--group", required=True, help="Consumer group name.")
@click.option("--topic", "topic_", required=True, help="Topic the group consumes.")
@click.option("--handler", "handler_spec", required=True, help="package.module:function")
@click.option(
    "--handler-path",
    "handler_path",
    multiple=True,
    type=click.Path(file_okay=False),
    envvar="PGCG_HANDLER_PATH",
    help="Also import the handler from this folder, searched first (repeatable; "
    "PGCG_HANDLER_PATH takes folders separated by ':'). The current directory is only "
    "searched when named, e.g. --handler-path .",
)
@click.option("--embedded-coordinator", is_flag=True,
              help="Also run a coordinator in this process (small deployments).")  # fmt: skip
@with_settings()
@run_cli
def consumer(
    group: str,
    topic_: str,
    handler_spec: str,
    handler_path: tuple[str, ...],
    embedded_coordinator: bool,
    settings: Settings,
) -> None:
    """Run one member of GROUP, consuming TOPIC with your handler.

    \b
    The handler is `async def handle(message) -> None` (a sync function runs in a
    thread); raising an exception retries the message with backoff, up to
    --max-attempts, then dead-letters it. `async def handle(message, tx)` runs in
    transactional mode (see README). Example:
      pgcg consumer --group billing --topic orders --handler myapp.handlers:handle
    """
    from pgcg.consumer.handlers import load
    from pgcg.consumer.runner import run_consumer

    handler = load(handler_spec, handler_path)
    run_consumer(settings, group=group, topic=topic_, handler=handler,
                 embedded_coordinator=embedded_coordinator)  # fmt: skip


@main.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option(
    "--handler-path",
    "handler_path",
    multiple=True,
    type=click.Path(file_okay=False),
    envvar="PGCG_HANDLER_PATH",
    help="Also import the module from this folder, searched first (repeatable).",
)
@with_settings()
@run_cli
def worker(app_spec: str, handler_path: tuple[str, ...], settings: Settings) -> None:
    """Run every handler of a pgcg.App (MODULE:APP) in this process.

    \b
    Each `@app.handler(topic=..., group=...)` joins its group; SIGTERM drains them all.
    Settings come from PGCG_* and these flags, unless the app was built with its own.
    Example:
      pgcg worker myapp.worker:app
    """
    from pgcg.consumer.app import App
    from pgcg.consumer.handlers import load
    from pgcg.consumer.runner import run_app
    from pgcg.shared.errors import HandlerLoadError

    app = load(app_spec, handler_path, option="MODULE:APP")
    if not isinstance(app, App):
        raise HandlerLoadError(f"{app_spec!r} is a {type(app).__name__}, not a pgcg.App")
    if not app.settings_given:
        app.settings = settings
    run_app(app)


@main.command()
@click.option("--group", "groups", multiple=True,
              help="Lead only this group (repeatable); default: every group.")  # fmt: skip
@with_settings()
@run_cli
def coordinator(groups: tuple[str, ...], settings: Settings) -> None:
    """Run a coordinator. Run two or more: one leads each group, the rest stand by.

    \b
    Example:
      pgcg coordinator                 # lead whichever groups it wins
      pgcg coordinator --group billing
    """
    from pgcg.coordinator.runner import run_coordinator

    run_coordinator(settings, groups=list(groups) or None)


# -- watching ------------------------------------------------------------------------------


@main.command()
@click.option("--group", help="Only this group (and its topic).")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON for scripts.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="--watch period.")
@with_settings("database_url", "pooler", "leader_timeout", "log_level", "log_format")
@run_cli
def status(
    group: str | None, as_json: bool, watch: bool, interval: float, settings: Settings
) -> None:
    """Per group: leader and its epoch, members, partitions with owner, epoch, state, lag
    and parked messages, dead letters, recent rebalances. Per topic: its segments and what
    holds storage back.

    \b
    Examples:
      pgcg status
      pgcg status --group billing --json | jq '.groups[0].lag_total'
      pgcg status --watch
    """
    import math
    import time

    from pgcg.shared import names, pooler
    from pgcg.shared import status as st
    from pgcg.shared.db import connect_sync

    if not (math.isfinite(interval) and 0 < interval <= 3600):
        raise InvalidInput(f"--interval must be between 0 and 3600 seconds, not {interval:g}")
    if group is not None:
        names.group_name(group)
    with connect_sync(settings.dsn()) as conn:
        if watch:
            pooler.adjust(conn, settings)
        while True:
            snapshot = st.collect(conn, group, leader_timeout=settings.leader_timeout)
            # JSON escapes control characters itself.
            text = st.to_json(snapshot) if as_json else st.render(printable_values(snapshot))
            if watch and not as_json:
                click.clear()
            click.echo(text)
            if not watch:
                return
            time.sleep(interval)


# -- dead letters -------------------------------------------------------------------------


def _dlq_filter(fn: F) -> F:
    for decorator in reversed(
        [
            click.option("--group", help="Only this group's (required for replay)."),
            click.option("--topic", "topic_", help="Only this topic."),
            click.option("--key", help="Only this ordering key."),
            click.option("--since", type=click.DateTime(), help="Dead-lettered at or after."),
            click.option("--until", type=click.DateTime(), help="Dead-lettered before."),
            click.option("--limit", type=int, default=1000, show_default=True),
        ]
    ):
        fn = decorator(fn)
    return fn


def _filter(group: str | None, topic_: str | None, key: str | None, since: datetime | None,
            until: datetime | None, limit: int) -> Any:  # fmt: skip
    from pgcg.shared.dlq import Filter

    return Filter(topic_, key, since, until, limit, group)


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters. Each group has its own.

    \b
    Example:
      pgcg dlq list --group billing
    """


@dlq.command("list")
@_dlq_filter
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@with_settings("database_url", "log_level", "log_format")
@run_cli
def dlq_list(as_json: bool, settings: Settings, **flt: Any) -> None:
    """List dead letters, oldest first: message id, group, topic, key, attempts, when,
    last error.

    \b
    Example:
      pgcg dlq list --group billing --key customer-42 --since 2026-01-01
    """
    from pgcg.shared import dlq as dead
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        rows = dead.list_dead(conn, _filter(**flt))
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, default=str))
        else:
            click.echo(
                f"{row['message_id']}\t{printable(row['group_name'] or '-')}\t"
                f"{printable(row['topic'])}\t{printable(row['key'])}\t"
                f"{row['attempts']}\t{row['dead_at']:%Y-%m-%d %H:%M:%S}\t"
                f"{printable((row['last_error'] or '')[:80])}"
            )


@dlq.command("replay")
@_dlq_filter
@with_settings("database_url", "log_level", "log_format")
@run_cli
def dlq_replay(settings: Settings, **flt: Any) -> None:
    """Enqueue a group's dead letters again, for that group only.

    \b
    Each goes to the end of its topic's log as a new message (a new id, printed), seen by
    no other group, with its headers and dedup key (the dedup window does not apply). It
    is handled after the messages of its key enqueued before the replay. Example:
      pgcg dlq replay --group billing --key customer-42
    """
    from pgcg.shared import dlq as dead
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        rows = dead.replay(conn, _filter(**flt))
    click.echo(
        json.dumps(
            {"replayed": len(rows), "ids": [r.id for r in rows],
             "from": [r.message_id for r in rows]}
        )
    )  # fmt: skip


@dlq.command("purge")
@_dlq_filter
@click.option("--all", "everything", is_flag=True, help="Purge without any filter.")
@with_settings("database_url", "log_level", "log_format")
@run_cli
def dlq_purge(everything: bool, settings: Settings, **flt: Any) -> None:
    """Delete dead letters for good.

    \b
    Example:
      pgcg dlq purge --group billing --until 2026-01-01
    """
    from pgcg.shared import dlq as dead
    from pgcg.shared.db import connect_sync

    with connect_sync(settings.dsn()) as conn:
        count = dead.purge(conn, _filter(**flt), everything=everything)
    click.echo(json.dumps({"purged": count}))


def _register() -> None:
    from pgcg.bench.chaos.run import chaos
    from pgcg.bench.cli import bench
    from pgcg.bench.demo import demo
    from pgcg.shared.cli_admin import group, roles, topic

    main.add_command(topic)
    main.add_command(group)
    main.add_command(roles)

    for command in (demo, chaos):
        # One line and the exit code for their errors too: a traceback would show the
        # database's error text, never meant for a terminal.
        assert command.callback is not None
        command.callback = run_cli(command.callback)
    main.add_command(demo)
    main.add_command(bench)
    main.add_command(chaos)


_register()


if __name__ == "__main__":
    main()
