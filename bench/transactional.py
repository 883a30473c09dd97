"""What transactional mode costs: ordered drain throughput, transactional vs plain handlers.

    python -m pgcg.bench.transactional [--messages 20000] [--keys 1000] [--rounds 3]

One in-process consumer drains the same N messages over the same K keys in each mode, on
a throwaway PostgreSQL (or --database-url, which must be migrated), with two workloads:

  noop   the handler does nothing: the pure cost of the mode (a transaction and its
         commit per message, against the writer's batched completions)
  write  the handler inserts one row into the same database: plain mode on a pooled
         autocommit connection of its own (at-least-once), transactional mode through
         `tx` (exactly-once; the insert commits with the message's completion)

Per round and mode: enqueue N messages in one transaction, warm up on a first small
batch, then time from the commit of the batch to the first poll that finds nothing left
for the group. Handlers check the key order. The median of the rounds is reported, with the
transactional/plain ratio per workload, as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import anyio.to_thread
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from pgcg.bench.database import remove_topic
from pgcg.bench.throwaway import ThrowawayPostgres
from pgcg.consumer.message import Message
from pgcg.consumer.service import Consumer
from pgcg.consumer.transactional import Transaction
from pgcg.shared.db import AsyncConn, connect, connect_sync, open_pool
from pgcg.shared.migrate import migrate
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries
from pgcg.shared.settings import Settings

COORD = Queries("coordinator")
BENCH_Q = Queries("bench")
WORKLOADS = ("noop", "write")
MODES = ("plain", "transactional")
WARMUP = 500
BATCH = 5_000


@dataclass
class Options:
    messages: int = 20_000
    keys: int = 1_000
    partitions: int = 16
    concurrency: int = 32
    prefetch: int = 2_000
    rounds: int = 3
    workloads: tuple[str, ...] = WORKLOADS
    database_url: str | None = None


class OrderCheck:
    """Counts handlings and per-key order violations (seq must grow within a key)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.handled = 0
        self.violations = 0

    def see(self, message: Message) -> None:
        seq = int(message.payload["seq"])
        if self.last.get(message.key, -1) >= seq:
            self.violations += 1
        self.last[message.key] = seq
        self.handled += 1


def _handler(mode: str, workload: str, check: OrderCheck, pool: Any) -> Callable[..., Any]:
    insert = "INSERT INTO public.bench_eo_effects (message_id, key) VALUES (%s, %s)"
    if mode == "plain":

        async def plain(message: Message) -> None:
            check.see(message)
            if workload == "write":
                async with pool.connection() as conn:
                    await conn.execute(insert, (message.id, message.key))

        return plain

    async def transactional(message: Message, tx: Transaction) -> None:
        check.see(message)
        if workload == "write":
            await tx.execute(insert, (message.id, message.key))

    return transactional


async def _assign(conn: AsyncConn, group: str, topic: str, partitions: int, member: str) -> None:
    params = {
        "group": group,
        "topic": topic,
        "partitions": list(range(partitions)),
        "members": [member] * partitions,
    }
    async with conn.transaction():
        await conn.execute(COORD.assign, params)
        await conn.execute(COORD.notify_group, {"group": group})


async def _wait_empty(conn: AsyncConn, topic: str, group: str) -> float:
    """Monotonic time of the first poll that finds nothing left for the group."""
    while True:
        cur = await conn.execute(BENCH_Q.unfinished, {"topic": topic})
        left = {r["group_name"]: r["unfinished"] for r in await cur.fetchall()}
        if left.get(group) == 0:
            return time.monotonic()
        await anyio.sleep(0.01)


def _enqueue(dsn: str, topic: str, first: int, count: int, keys: int) -> float:
    """Enqueue messages first..first+count in one transaction; monotonic time of its commit."""
    with connect_sync(dsn, autocommit=False) as conn:
        for start in range(first, first + count, BATCH):
            seqs = range(start, min(start + BATCH, first + count))
            enqueue_many_sync(
                conn, topic, [OutgoingMessage(f"key-{s % keys}", {"seq": s}) for s in seqs]
            )
        conn.commit()
        return time.monotonic()


async def _drain_once(dsn: str, opts: Options, mode: str, workload: str) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    topic, group = f"bench_eo_{suffix}", f"bench-eo-{suffix}"
    with connect_sync(dsn) as admin:
        admin.execute("SELECT pgcg.create_topic(%s, %s)", (topic, opts.partitions))
        admin.execute("TRUNCATE public.bench_eo_effects")
    check = OrderCheck()
    pool: AsyncConnectionPool[AsyncConn] | None = None
    if mode == "plain" and workload == "write":
        size = opts.concurrency
        pool = await open_pool(dsn, min_size=size, max_size=size, name="bench-plain-writes")
    settings = Settings(concurrency=opts.concurrency, prefetch=opts.prefetch)
    consumer = Consumer(
        settings, group=group, topic=topic, handler=_handler(mode, workload, check, pool), dsn=dsn
    )
    conn = await connect(dsn)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consumer.run(install_signal_handlers=False))
            await consumer.joined.wait()
            await _assign(conn, group, topic, opts.partitions, consumer.member_id)
            # Warm up: connections opened, statements prepared, partitions adopted.
            await anyio.to_thread.run_sync(_enqueue, dsn, topic, 0, WARMUP, opts.keys)
            await _wait_empty(conn, topic, group)
            committed = await anyio.to_thread.run_sync(
                _enqueue, dsn, topic, WARMUP, opts.messages, opts.keys
            )
            cpu = time.process_time()
            empty = await _wait_empty(conn, topic, group)
            cpu = time.process_time() - cpu
            consumer.stop()
    finally:
        await conn.close()
        if pool is not None:
            await pool.close()
    seconds = empty - committed
    if check.handled < WARMUP + opts.messages or check.violations:
        raise RuntimeError(
            f"{mode}/{workload}: handled {check.handled} of {WARMUP + opts.messages}, "
            f"{check.violations} key order violations"
        )
    with connect_sync(dsn) as admin:
        effects = admin.execute("SELECT count(*) AS n FROM public.bench_eo_effects").fetchone()
        with admin.transaction():
            remove_topic(admin, topic)
    return {
        "seconds": round(seconds, 3),
        "msgs_per_s": round(opts.messages / seconds),
        # CPU of this process (consumer and poller) per message while draining.
        "client_cpu_ms_per_msg": round(1000 * cpu / opts.messages, 3),
        "handled": check.handled,
        "effects": int(effects["n"]) if effects else 0,  # type: ignore[index]
    }


async def _run(dsn: str, opts: Options) -> dict[str, Any]:
    with connect_sync(dsn) as admin:
        admin.execute(
            "CREATE TABLE IF NOT EXISTS public.bench_eo_effects "
            "(id bigserial PRIMARY KEY, message_id bigint NOT NULL, key text NOT NULL)"
        )
        server = {
            name: admin.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[name]  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit")
        }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {m: [] for m in MODES} for w in opts.workloads
    }
    for _ in range(opts.rounds):
        for workload in opts.workloads:
            for mode in MODES:  # alternate, so drift in the host hits both modes alike
                runs[workload][mode].append(await _drain_once(dsn, opts, mode, workload))
    summary: dict[str, Any] = {}
    for workload, by_mode in runs.items():
        median = {m: statistics.median(r["msgs_per_s"] for r in by_mode[m]) for m in MODES}
        cpu = {m: statistics.median(r["client_cpu_ms_per_msg"] for r in by_mode[m]) for m in MODES}
        summary[workload] = {
            "plain_msgs_per_s": round(median["plain"]),
            "transactional_msgs_per_s": round(median["transactional"]),
            "ratio_transactional_to_plain": round(median["transactional"] / median["plain"], 3),
            "plain_client_cpu_ms_per_msg": cpu["plain"],
            "transactional_client_cpu_ms_per_msg": cpu["transactional"],
        }
    return {
        "config": asdict(opts) | {"database_url": None},
        "server": server,
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "summary": summary,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgcg.bench.transactional")
    defaults = Options()
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument("--keys", type=int, default=defaults.keys)
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--prefetch", type=int, default=defaults.prefetch)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--workload", action="append", choices=WORKLOADS, dest="workloads")
    parser.add_argument("--database-url", help="a migrated database (default: a throwaway one)")
    args = vars(parser.parse_args(argv))
    args["workloads"] = tuple(args["workloads"] or WORKLOADS)
    opts = Options(**args)
    logging.basicConfig(level=logging.WARNING)
    # A consumer stopping after each run logs its partitions going: not news here.
    logging.getLogger("pgcg").setLevel(logging.ERROR)
    if opts.database_url:
        result = anyio.run(_run, opts.database_url, opts)
    else:
        with ThrowawayPostgres() as server:
            migrate(server.url)
            result = anyio.run(_run, server.url, opts)
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    try:
        main()
    except (psycopg.Error, RuntimeError) as exc:
        sys.exit(f"bench failed: {exc}")
