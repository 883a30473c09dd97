"""A recorded history of a run, and the checker over it (demo, chaos runs, tests).

What is recorded, each piece in a way that survives the process that wrote it dying:
- the producer writes each message's (seq, key, id) in the same transaction as the
  enqueue, so the produced table is exactly what was committed;
- the recording handler journals every handling (group, message, key, seq, member, epoch,
  process, start, end) in its own transaction;
- triggers record every completion a group's fenced write recorded (when, and from which
  process's session) and every change of a partition's owner or epoch, per group.

The checker then proves, for every group of the topic (each must handle every message),
trusting nothing the fencing under test decides:
- no loss: every produced message has an accepted handling, or is dead-lettered (or,
  reported separately, still pending);
- key order: no message was handled after a later message of its key had finished;
- no concurrency per key: accepted handlings of one key never overlap in time. Overlaps
  with superseded handlings are zombie work whose ack the fence rejected; they are counted;
- no stale ack: no completion was recorded after its handling's epoch had ended;
- no stale work: no handling started after its epoch had ended (a member must stop before
  anyone else can be given its partitions);
- no stale leader: no rebalance was recorded by a leader after a newer leader epoch had
  recorded one (a deposed coordinator writes nothing);
- duplicates (more than one handling of a message) are counted. A message handled again
  after a completion of it had been recorded is always a violation, whatever the faults
  (a completion that committed is never undone, and the next owner reads it back).
  Otherwise a repeat must follow something that can cause a redelivery: a fault that was
  injected (a crash, a pause, a network fault, a server restart), a forced hand-off, or
  an earlier handling whose completion never took effect (its handler was cut off, by a
  drain deadline or a lease that ran out, after its own side effects, such as its
  journal row, were written: at-least-once). A repeat after a handling whose completion
  did take effect, with no fault in between, is a violation;
- the longest time a partition had no working owner.

The accepted handling of a message is the last one its completing process journaled before
the completion: the write that took effect is the one that recorded it.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgcg.consumer.message import Message
from pgcg.shared.producer import MAX_KEY_BYTES, OutgoingMessage, enqueue_many_sync
from pgcg.shared.queries import Queries

Q = Queries("journal")

# Simulated work per message in the recording handler (milliseconds).
WORK_ENV = "PGCG_JOURNAL_WORK_MS"
# Where the recording handler writes (default: PGCG_DATABASE_URL). A chaos run points it
# straight at the server, so the history is recorded outside the faults it injects, as
# a handler's side effects usually go to another system than its queue.
DSN_ENV = "PGCG_JOURNAL_DATABASE_URL"
# Simulated work per message of the `def` handler (default: WORK_ENV's).
SYNC_WORK_ENV = "PGCG_JOURNAL_SYNC_WORK_MS"

# Test builds only: pgcg.owned replaced by one that lets every write through.
UNFENCED = Q.unfenced
# Test builds only: pgcg.settle replaced by one that counts a parked message's delivery when
# its handler returned, not when it was claimed.
COUNT_AFTER_HANDLER = Q.count_after_handler
EXPIRE_ON_DATABASE_CLOCK = Q.expire_on_database_clock
# For the fault revoke-cancel-fetch: pgcg.fetch replaced by one that a fetch of a group the
# fault lists waits in for the locks the fault holds meanwhile, before it reads and with
# the rows it read.
HOLD_FETCHES = Q.hold_fetches
# `assignment-lock` faults: a rebalance that read a member's join waits on the group's gate.
REBALANCE_GATE = Q.rebalance_gate
# Test builds only: revoke deadlines from the rebalance transaction's start, lock waits
# unbounded (install after REBALANCE_GATE, whose function it alters).
DEADLINE_FROM_TRANSACTION_START = Q.deadline_from_transaction_start
# Per group and partition of a topic: what the group has not finished, and who owns it.
PENDING_BY_PARTITION = Q.pending_by_partition
# pgcg's own state, kept with a failed run's history.
DUMP_LEDGER, DUMP_TICKS, DUMP_PROGRESS = Q.dump_ledger, Q.dump_ticks, Q.dump_progress
# A drain that did not finish, seen while its processes still run.
DUMP_ACTIVITY, DUMP_PARKED_HEADS = Q.dump_activity, Q.dump_parked_heads

_conn: psycopg.AsyncConnection[Any] | None = None
_conn_lock: anyio.Lock | None = None


def create(conn: psycopg.Connection[Any]) -> None:
    """The journal tables and triggers; run after `pgcg migrate`."""
    conn.execute(Q.create)


def undo_clock_steps(conn: psycopg.Connection[Any], offset_file: Path) -> None:
    """The history's server-side timestamps take back the step of a server whose clock a
    run steps (ThrowawayPostgres(fake_clock=True), its offset in `offset_file`)."""
    conn.execute(sql.SQL(Q.real_clock).format(path=sql.Literal(str(offset_file))))


# Poison messages (the producer marks them in the payload, `{"poison": kind}`): the
# handler raises on every delivery of a `raise` one, and kills its own process (os._exit,
# no cleanup) on every delivery of a `crash` one. Each delivery is journaled first.
POISON_KINDS = ("raise", "crash")
CRASH_EXIT = 13  # the exit code of a consumer a crashing poison message took down
# Test builds only (`pgcg chaos --unsafe-release-running-handlers`): a consumer lets a
# partition go while a `def` handler's thread still runs on it, instead of exiting.
UNSAFE_THREADS_ENV = "PGCG_CHAOS_UNSAFE_RELEASE_RUNNING_HANDLERS"
# Test builds only (`pgcg chaos --unsafe-unstorable-errors`): a handler's error goes to the
# database as it is, and a write the database refuses stops the consumer.
UNSAFE_ERRORS_ENV = "PGCG_CHAOS_UNSAFE_UNSTORABLE_ERRORS"
# Test builds only (`pgcg chaos --unsafe-take-in-revoked-reads`): rows of a read in flight
# are taken in though their partition was revoked meanwhile.
UNSAFE_READS_ENV = "PGCG_CHAOS_UNSAFE_TAKE_IN_REVOKED_READS"
# What a raising poison message says: a NUL and a lone surrogate, which PostgreSQL's text
# (and the driver) refuse, as an error quoting binary input may hold.
UNSTORABLE = "\x00\udcff"


class PoisonError(Exception):
    """The recording handler always fails on a message produced as `raise` poison, with
    an error text the database cannot store as it is."""


def _unsafe_release(owned: Any, reason: str) -> None:
    import logging

    logging.getLogger("pgcg.chaos.unsafe").warning(
        "UNSAFE: partition %s let go after %s while %s handler thread(s) still run on it",
        owned.partition, reason, owned.threads,
        extra={"action": "unsafe_release", "partition": owned.partition},
    )  # fmt: skip


if os.environ.get(UNSAFE_THREADS_ENV):
    # Assignment.on_stuck defaults to assignment.halt (stop the process): the consumer
    # imports its handler before it builds its Assignment, so this replaces that default.
    from pgcg.consumer import assignment as _assignment

    _assignment.halt = _unsafe_release  # type: ignore[assignment]

if os.environ.get(UNSAFE_ERRORS_ENV):
    # The writer escapes what the database cannot store and treats a refused write as
    # that item's problem; undone here, a raising poison message stops its consumer.
    from pgcg.consumer import writer as _writer

    _writer.storable = lambda text: text  # type: ignore[assignment]
    _writer.REFUSED = ()  # type: ignore[assignment]

if os.environ.get(UNSAFE_READS_ENV):
    # The reader leaves out rows read for a partition revoked while they were on their
    # way (reader.taking_in); taken in here, a revocation called off then runs a key's
    # later message before the earlier ones the revocation dropped.
    import logging

    from pgcg.consumer import reader as _reader

    _taken: set[tuple[int, int, float | None]] = set()  # once per revocation

    def _take_in_anyway(part: Any) -> bool:
        revocation = (part.partition, part.epoch, part.revoke_by)
        if part.state != "assigned" and revocation not in _taken:
            _taken.add(revocation)
            logging.getLogger("pgcg.chaos.unsafe").warning(
                "UNSAFE: rows read for partition %s taken in while it is %s",
                part.partition, part.state,
                extra={"action": "unsafe_take_in", "partition": part.partition,
                       "epoch": part.epoch},
            )  # fmt: skip
        return True

    _reader.taking_in = _take_in_anyway  # type: ignore[assignment]


def _row(message: Message, started: datetime, finished: datetime, kind: str) -> dict[str, Any]:
    return {
        "group": message.group,
        "message_id": message.id,
        "key": message.key,
        "seq": int(message.payload["seq"]),
        "partition": message.partition,
        "member_id": message.member_id,
        "epoch": message.epoch,
        "attempt": message.attempt,
        "pid": os.getpid(),
        "started_at": started,
        "finished_at": finished,
        "kind": kind,
    }


def _poison_kind(message: Message) -> str | None:
    payload = message.payload
    return payload.get("poison") if isinstance(payload, dict) else None


def _poisoned(message: Message, poison: str) -> None:
    """After the poison delivery was journaled: fail, or take the process down."""
    if poison == "crash":
        os._exit(CRASH_EXIT)
    raise PoisonError(
        f"seq {message.payload['seq']} is poison: the handler always fails on it {UNSTORABLE}"
    )


async def record(message: Message) -> None:
    """Handler: journal this handling. `pgcg consumer --handler pgcg.bench.chaos.journal:record`."""
    global _conn, _conn_lock
    started = datetime.now(UTC)
    poison = _poison_kind(message)
    work_ms = float(os.environ.get(WORK_ENV, "0") or 0)
    if work_ms and poison is None:
        await anyio.sleep(work_ms / 1000)
    finished = datetime.now(UTC)
    if _conn_lock is None:
        _conn_lock = anyio.Lock()
    async with _conn_lock:
        if _conn is None or _conn.closed:
            dsn = os.environ.get(DSN_ENV) or os.environ["PGCG_DATABASE_URL"]
            _conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10)
        try:
            row = _row(message, started, finished, "async")
            if poison is None:
                await _conn.execute(Q.record, row)
            else:
                await _conn.execute(Q.record_poison, {**row, "poison": poison})
        except BaseException:
            # Failed or cancelled mid-statement: the connection's state is unknown, so the
            # next handling starts on a new one (the statement may still commit, late).
            conn, _conn = _conn, None
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
    if poison is not None:
        _poisoned(message, poison)


_local = threading.local()


def record_sync(message: Message) -> None:
    """The same handler as a plain `def`: the consumer runs it in a worker thread, which
    cancellation cannot stop (`...journal:record_sync`). One connection per thread."""
    started = datetime.now(UTC)
    poison = _poison_kind(message)
    work_ms = float(os.environ.get(SYNC_WORK_ENV) or os.environ.get(WORK_ENV, "0") or 0)
    if work_ms and poison is None:
        time.sleep(work_ms / 1000)
    finished = datetime.now(UTC)
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        dsn = os.environ.get(DSN_ENV) or os.environ["PGCG_DATABASE_URL"]
        conn = _local.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    try:
        row = _row(message, started, finished, "sync")
        if poison is None:
            conn.execute(Q.record, row)
        else:
            conn.execute(Q.record_poison, {**row, "poison": poison})
    except BaseException:
        _local.conn = None
        conn.close()
        raise
    if poison is not None:
        _poisoned(message, poison)


def big_key(prefix: str, n: int) -> str:
    """A key of exactly the producer's limit in UTF-8 bytes, mostly multibyte characters
    (2, 3 or 4 bytes each, by `n`): where byte and character counts part ways."""
    pad = ("é", "€", "🔑")[n % 3]
    room = MAX_KEY_BYTES - len(prefix.encode())
    chars = room // len(pad.encode())
    return prefix + pad * chars + "x" * (room - chars * len(pad.encode()))


def key_of(seq: int, keys: int, big: bool = False) -> str:
    """The ordering key of a normal message; with `big`, every eighth key is as long as
    allowed."""
    i = seq % keys
    return big_key(f"key-{i}-", i) if big and i % 8 == 7 else f"key-{i}"


def poison_of(seq: int, seed: int, every: int) -> str | None:
    """Whether message `seq` is poison, and which kind: about one in `every`, a third of
    them crashing; fixed by the seed."""
    if every <= 0:
        return None
    rng = random.Random(seed * 1_000_003 + seq)
    if rng.random() >= 1 / every:
        return None
    return "crash" if rng.random() < 1 / 3 else "raise"


def enqueue_poison(dsn: str, topic: str, kinds: Sequence[str]) -> None:
    """Poison messages of the given kinds now, each on a key of its own at the byte limit,
    recorded with negative seqs (-1, -2, ...: the producer's are dense from 0)."""
    with psycopg.connect(dsn, row_factory=dict_row, connect_timeout=10) as conn:
        low = conn.execute(Q.min_seq).fetchone()["seq"]  # type: ignore[index]
        seqs = [min(low, 0) - 1 - i for i in range(len(kinds))]
        keys = [big_key(f"poison-{k}-{s}-", -s) for s, k in zip(seqs, kinds, strict=True)]
        with conn.transaction():
            done = enqueue_many_sync(
                conn,
                topic,
                [
                    OutgoingMessage(key, {"seq": s, "poison": k})
                    for s, k, key in zip(seqs, kinds, keys, strict=True)
                ],
            )
            conn.execute(
                Q.produced,
                {"seqs": seqs, "keys": keys, "ids": [d.id for d in done], "poison": list(kinds)},
            )


class Producer(threading.Thread):
    """Enqueues `rate` messages a second over `keys` keys until stopped (or `limit`); about
    one in `poison_every` (0: none) is poison, on a key of its own (see poison_of);
    `big_keys`: every eighth key at the producer's byte limit (see key_of)."""

    def __init__(
        self,
        dsn: str,
        topic: str,
        *,
        keys: int,
        rate: float,
        limit: int | None = None,
        seed: int = 0,
        poison_every: int = 0,
        big_keys: bool = False,
    ) -> None:
        super().__init__(daemon=True, name="pgcg-journal-producer")
        self.dsn, self.topic, self.keys, self.rate, self.limit = dsn, topic, keys, rate, limit
        self.seed, self.poison_every, self.big_keys = seed, poison_every, big_keys
        self.stop_event = threading.Event()
        self.produced = 0
        self.errors = 0

    def run(self) -> None:
        batch = max(1, int(self.rate / 20))
        conn: psycopg.Connection[Any] | None = None
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            if self.limit is not None and self.produced >= self.limit:
                return
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, row_factory=dict_row, connect_timeout=10)
                    start = conn.execute(Q.max_seq).fetchone()["seq"] + 1  # type: ignore[index]
                    conn.commit()
                    # Seqs are dense from 0, so this is the count. A commit whose answer
                    # was lost may have gone through: count what the database holds.
                    seq = self.produced = start
                n = batch if self.limit is None else min(batch, self.limit - self.produced)
                if n <= 0:
                    return
                seqs = list(range(seq, seq + n))
                poison = [poison_of(s, self.seed, self.poison_every) for s in seqs]
                keys = [
                    key_of(s, self.keys, self.big_keys)
                    if p is None
                    else big_key(f"poison-{p}-{s}-", s)
                    for s, p in zip(seqs, poison, strict=True)
                ]
                payloads = [
                    {"seq": s} if p is None else {"seq": s, "poison": p}
                    for s, p in zip(seqs, poison, strict=True)
                ]
                with conn.transaction():
                    done = enqueue_many_sync(
                        conn,
                        self.topic,
                        [OutgoingMessage(k, p) for k, p in zip(keys, payloads, strict=True)],
                    )
                    conn.execute(
                        Q.produced,
                        {"seqs": seqs, "keys": keys, "ids": [d.id for d in done],
                         "poison": poison},
                    )  # fmt: skip
                seq += n
                self.produced += n
            except Exception:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.stop_event.wait(0.2)
                continue
            # After an outage, resume the rate from now rather than bursting to catch up.
            next_at = max(next_at + n / self.rate, time.monotonic() - 1.0)
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


# -- the checker ---------------------------------------------------------------------------

# Faults after which a message may legitimately be handled again.
REDELIVERY_CAUSES = frozenset(
    {
        "consumer-kill",
        "consumer-crash",  # a consumer that exited by itself (a poison message, exit 6)
        # A consumer's own lease ran out (its heartbeats late: a loaded host), so it let
        # its partitions go, as designed; read from its log, not injected.
        "self-fence",
        "consumer-pause",
        "net-cut",
        "net-stall",
        "net-blackhole",
        "net-blackhole-kernel",
        "pg-restart-fast",
        "pg-restart-immediate",
    }
)
# Faults during which a consumer cannot act on what it owns.
OWNER_DOWN = frozenset(
    {
        "consumer-kill",
        "consumer-crash",
        "consumer-pause",
        "net-cut",
        "net-stall",
        "net-blackhole",
        "net-blackhole-kernel",
    }
)
# A handler task dispatched just before SIGSTOP stamps its start after SIGCONT.
RESUME_GRACE = timedelta(seconds=1)
SLACK = timedelta(seconds=1)
FOREVER = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Disruption:
    """A fault a runner injected, so the checker can tell expected anomalies (a duplicate
    after a crash) from violations."""

    kind: str  # consumer-kill | consumer-pause | net-cut | ... (see chaos.FAULT_KINDS)
    start: datetime
    end: datetime | None = None  # None: never healed (a killed process)
    pid: int | None = None  # the process it hit; None: every process (a server restart)

    def hits(self, pid: int) -> bool:
        return self.pid is None or self.pid == pid

    def overlaps(self, a: datetime, b: datetime) -> bool:
        return self.start <= b and (self.end or FOREVER) >= a


@dataclass
class Verdict:
    produced: int = 0
    # Distinct messages with an accepted handling (with several groups: in every group).
    handled: int = 0
    handled_ids: set[int] = field(default_factory=set, repr=False)
    pending: int = 0
    dead_lettered: int = 0
    lost: list[int] = field(default_factory=list)  # seqs
    order_violations: list[str] = field(default_factory=list)
    concurrent_violations: list[str] = field(default_factory=list)
    stale_acks: list[str] = field(default_factory=list)
    stale_work: list[str] = field(default_factory=list)
    stale_leader_writes: list[str] = field(default_factory=list)
    unexplained_duplicates: list[str] = field(default_factory=list)
    # A handler (async or a def handler's thread) still running on a partition after a
    # later owner of it had started handling.
    late_handlers: list[str] = field(default_factory=list)
    # A poison message not dead-lettered, delivered more than max_attempts times, or
    # dead-lettered without the reason it should carry.
    poison_violations: list[str] = field(default_factory=list)
    # A message of a healthy key handled later than the stated bound, away from faults.
    delayed: list[str] = field(default_factory=list)
    sync_handlings: int = 0  # handlings by def handlers (in worker threads)
    # Healthy messages dead-lettered: in flight each time a crash cut them off, until
    # their attempts ran out (a crashing poison message takes its neighbours with it).
    dead_healthy: int = 0
    frozen_late: int = 0  # late handlings explained by a SIGSTOP of their process
    poison: int = 0  # poison messages (per group)
    poison_deliveries: int = 0
    delay_bound_s: float | None = None
    max_delay_s: float = 0.0  # the longest delay among messages the bound applies to
    delay_checked: int = 0  # messages the bound applied to (away from injected faults)
    duplicates: int = 0  # extra handlings (after a crash or forced hand-off)
    duplicate_causes: dict[str, int] = field(default_factory=dict)
    fenced_overlaps: int = 0  # zombie work overlapping the new owner's, rejected at ack
    resumed_starts: int = 0  # stale starts stamped just after SIGCONT (dispatched before)
    attributed_acks: int = 0  # accepted acks matched to a handling by process
    max_unowned_s: float = 0.0  # longest time a partition had no working owner
    max_unowned_partition: int | None = None
    max_unowned_since: datetime | None = None
    max_unassigned_s: float = 0.0  # longest time a partition had no owner at all
    groups: dict[str, Verdict] = field(default_factory=dict)  # per group, when several

    @property
    def violations(self) -> dict[str, int]:
        return {
            "lost": len(self.lost),
            "order": len(self.order_violations),
            "concurrent": len(self.concurrent_violations),
            "stale_acks": len(self.stale_acks),
            "stale_work": len(self.stale_work),
            "stale_leader_writes": len(self.stale_leader_writes),
            "unexplained_duplicates": len(self.unexplained_duplicates),
            "late_handlers": len(self.late_handlers),
            "poison": len(self.poison_violations),
            "delayed": len(self.delayed),
        }

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def summary(self) -> str:
        return (
            f"produced={self.produced} handled={self.handled} pending={self.pending} "
            f"dead={self.dead_lettered} lost={len(self.lost)} "
            f"order_violations={len(self.order_violations)} "
            f"concurrent_violations={len(self.concurrent_violations)} "
            f"stale_acks={len(self.stale_acks)} stale_work={len(self.stale_work)} "
            f"duplicates={self.duplicates} "
            f"unexplained_duplicates={len(self.unexplained_duplicates)} "
            f"fenced_overlaps={self.fenced_overlaps} "
            f"max_unowned_s={self.max_unowned_s:.2f}"
        )

    def examples(self, n: int = 5) -> list[str]:
        """The first few of each kind of violation, for a report."""
        out: list[str] = []
        if self.groups:
            out.extend(
                f"lost seqs [{name}]: {v.lost[:n]}" for name, v in self.groups.items() if v.lost
            )
        elif self.lost:
            out.append(f"lost seqs: {self.lost[:n]}")
        for name, items in (
            ("order", self.order_violations),
            ("concurrent", self.concurrent_violations),
            ("stale ack", self.stale_acks),
            ("stale work", self.stale_work),
            ("stale leader write", self.stale_leader_writes),
            ("unexplained duplicate", self.unexplained_duplicates),
            ("late handler", self.late_handlers),
            ("poison", self.poison_violations),
            ("delayed", self.delayed),
        ):
            out.extend(f"{name}: {item}" for item in items[:n])
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "violations": self.violations,
            "produced": self.produced,
            "handled": self.handled,
            "pending": self.pending,
            "dead_lettered": self.dead_lettered,
            "duplicates": self.duplicates,
            "duplicate_causes": self.duplicate_causes,
            "fenced_overlaps": self.fenced_overlaps,
            "resumed_starts": self.resumed_starts,
            "attributed_acks": self.attributed_acks,
            "sync_handlings": self.sync_handlings,
            "dead_healthy": self.dead_healthy,
            "frozen_late": self.frozen_late,
            "poison_messages": self.poison,
            "poison_deliveries": self.poison_deliveries,
            "delay_bound_s": self.delay_bound_s,
            "max_delay_s": round(self.max_delay_s, 3),
            "delay_checked": self.delay_checked,
            "max_unowned_s": round(self.max_unowned_s, 3),
            "max_unowned_partition": self.max_unowned_partition,
            "max_unowned_since": self.max_unowned_since,
            "max_unassigned_s": round(self.max_unassigned_s, 3),
            "examples": self.examples(),
            "groups": {name: v.as_dict() for name, v in self.groups.items()},
        }

    def add(self, other: Verdict, group: str) -> None:
        """Fold one group's verdict into this one (violations get the group's name)."""
        self.handled_ids = (
            set(other.handled_ids) if not self.groups else self.handled_ids & other.handled_ids
        )
        self.handled = len(self.handled_ids)
        self.groups[group] = other
        self.pending += other.pending
        self.dead_lettered += other.dead_lettered
        self.lost += other.lost
        for name in (
            "order_violations",
            "concurrent_violations",
            "stale_acks",
            "stale_work",
            "stale_leader_writes",
            "unexplained_duplicates",
            "late_handlers",
            "poison_violations",
            "delayed",
        ):
            getattr(self, name).extend(f"[{group}] {v}" for v in getattr(other, name))
        for name in ("sync_handlings", "frozen_late", "poison", "poison_deliveries",
                     "delay_checked", "dead_healthy"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.delay_bound_s = other.delay_bound_s
        self.max_delay_s = max(self.max_delay_s, other.max_delay_s)
        self.duplicates += other.duplicates
        for cause, n in other.duplicate_causes.items():
            self.duplicate_causes[cause] = self.duplicate_causes.get(cause, 0) + n
        self.fenced_overlaps += other.fenced_overlaps
        self.resumed_starts += other.resumed_starts
        self.attributed_acks += other.attributed_acks
        if other.max_unowned_s > self.max_unowned_s:
            self.max_unowned_s = other.max_unowned_s
            self.max_unowned_partition = other.max_unowned_partition
            self.max_unowned_since = other.max_unowned_since
        self.max_unassigned_s = max(self.max_unassigned_s, other.max_unassigned_s)


Row = dict[str, Any]


def check(
    conn: psycopg.Connection[Any],
    topic: str,
    *,
    disruptions: Sequence[Disruption] | None = None,
    window: tuple[datetime, datetime] | None = None,
    groups: Iterable[str] = (),
    max_attempts: int | None = None,
    delay_bound: float | None = None,
    faulted: Sequence[tuple[datetime, datetime]] = (),
) -> Verdict:
    """Check the recorded history of `topic`, for every group that consumes it.

    `disruptions` (what a runner injected) lets duplicates be told apart from violations
    and start stamps taken after a SIGCONT be recognised; without it, duplicates are only
    counted. `window` bounds the ownership measurements (default: the whole history).
    `groups`: groups that must be there (a run's own); one that never came to be has lost
    every message. Every group must account for every produced message: a message counts
    as handled when every group handled it; violations add up, each named after its group.
    `max_attempts`: what the consumers ran with; every poison message must be
    dead-lettered within that many deliveries. `delay_bound`: seconds within which every
    message of a healthy key is handled once produced, unless its wait overlaps one of the
    `faulted` stretches (each fault's span and the settling after it) or the warm-up
    before `window`.
    """
    conn.row_factory = dict_row  # type: ignore[assignment]
    produced = {r["seq"]: r for r in conn.execute(Q.produced_rows)}
    verdict = Verdict(produced=len(produced))
    _leaders(conn.execute(Q.rebalances, {"topic": topic}).fetchall(), verdict)
    present = [r["group_name"] for r in conn.execute(Q.groups, {"topic": topic})]
    for group in sorted({*present, *groups}):
        limits = _Limits(max_attempts, delay_bound, faulted)
        verdict.add(_check_group(conn, group, produced, disruptions, window, limits), group)
    return verdict


def _check_group(
    conn: psycopg.Connection[Any],
    group: str,
    produced: dict[int, Row],
    disruptions: Sequence[Disruption] | None,
    window: tuple[datetime, datetime] | None,
    limits: _Limits | None = None,
) -> Verdict:
    params = {"group": group}
    rows: list[Row] = conn.execute(Q.journal_rows, params).fetchall()
    completed: dict[int, Row] = {}
    for r in conn.execute(Q.completed_rows, params):
        completed.setdefault(r["message_id"], r)  # the first completion is the one that took
    history: list[Row] = conn.execute(Q.ownership_rows, params).fetchall()
    pending = {r["id"] for r in conn.execute(Q.pending_ids, params)}
    dead = {r["message_id"] for r in conn.execute(Q.dead_ids, params)}
    forced: dict[int, list[datetime]] = defaultdict(list)
    for r in conn.execute(Q.forced_handoffs, params):
        forced[r["partition"]].append(r["started_at"])
    verdict = Verdict(produced=len(produced), pending=len(pending), dead_lettered=len(dead))

    by_message: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        by_message[r["message_id"]].append(r)
    accepted = _accepted(by_message, completed, dead, verdict)
    verdict.handled_ids = set(accepted)
    verdict.handled = len(accepted)
    # A message completed without a journaled handling before it counts as lost too.
    verdict.lost = sorted(
        seq
        for seq, p in produced.items()
        if p["message_id"] not in accepted
        and p["message_id"] not in pending
        and p["message_id"] not in dead
    )

    epochs = _EpochEnds(history)
    pauses: dict[int, list[Disruption]] = defaultdict(list)
    for d in disruptions or ():
        if d.kind == "consumer-pause" and d.pid is not None:
            pauses[d.pid].append(d)

    resumed: set[int] = set()  # journal ids of stale starts explained by a SIGCONT
    for r in rows:
        ended = epochs.ended(r["partition"], r["epoch"])
        if ended is None or r["started_at"] <= ended:
            continue
        if any(
            p.start <= ended <= (p.end or FOREVER)
            and p.end is not None
            and p.end <= r["started_at"] <= p.end + RESUME_GRACE
            for p in pauses.get(r["pid"], ())
        ):
            resumed.add(r["id"])
            continue
        verdict.stale_work.append(
            f"seq {r['seq']} ({r['key']}, partition {r['partition']}) started at "
            f"{r['started_at']:%T.%f} by {r['member_id']} under epoch {r['epoch']}, which "
            f"had ended at {ended:%T.%f}"
        )
    verdict.resumed_starts = len(resumed)

    for mid, r in accepted.items():
        gone = completed.get(mid)
        ended = epochs.ended(r["partition"], r["epoch"])
        if gone is not None and ended is not None and gone["completed_at"] > ended:
            verdict.stale_acks.append(
                f"seq {r['seq']} ({r['key']}, partition {r['partition']}): completion of "
                f"{r['member_id']} under epoch {r['epoch']} accepted at "
                f"{gone['completed_at']:%T.%f}, after that epoch ended at {ended:%T.%f}"
            )

    by_key: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r["id"] not in resumed:
            by_key[r["key"]].append(r)
    accepted_ids = {r["id"] for r in accepted.values()}
    for key, handlings in by_key.items():
        handlings.sort(key=lambda r: r["started_at"])
        _check_key(key, handlings, accepted_ids, verdict)

    _duplicates(by_message, disruptions, forced, accepted_ids, completed, verdict)
    _ownership(history, disruptions or (), window, rows, verdict)
    verdict.sync_handlings = sum(1 for r in rows if r.get("kind") == "sync")
    poisoned = {p["message_id"] for p in produced.values() if p.get("poison") is not None}
    verdict.dead_healthy = len(dead - poisoned)
    _late_handlers(rows, pauses, verdict)
    limits = limits or _Limits()
    _check_poison(conn.execute(Q.poison_rows, params).fetchall(), limits.max_attempts, verdict)
    if limits.delay_bound is not None:
        _delays(produced, accepted, window, limits, verdict)
    return verdict


@dataclass(frozen=True)
class _Limits:
    max_attempts: int | None = None
    delay_bound: float | None = None
    faulted: Sequence[tuple[datetime, datetime]] = ()


def _late_handlers(rows: list[Row], pauses: dict[int, list[Disruption]], verdict: Verdict) -> None:
    """No handling, of any kind, may still run on a partition once a later epoch's owner
    started handling there: a cancelled async handler stops, and a def handler's thread
    (which nothing can stop) keeps its partition, or its process exits. Only a process
    frozen by SIGSTOP meanwhile is excused (it cannot act on anything while frozen)."""
    by_partition: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        by_partition[r["partition"]].append(r)
    for partition, handlings in by_partition.items():
        first: dict[int, datetime] = {}
        for r in handlings:
            if r["epoch"] not in first or r["started_at"] < first[r["epoch"]]:
                first[r["epoch"]] = r["started_at"]
        # epoch -> the first start under any later epoch
        later: dict[int, datetime | None] = {}
        soonest: datetime | None = None
        for epoch in sorted(first, reverse=True):
            later[epoch] = soonest
            if soonest is None or first[epoch] < soonest:
                soonest = first[epoch]
        for r in handlings:
            successor = later[r["epoch"]]
            if successor is None or r["finished_at"] <= successor:
                continue
            if any(
                p.start <= r["finished_at"] and (p.end or FOREVER) + RESUME_GRACE >= r["started_at"]
                for p in pauses.get(r["pid"], ())
            ):
                verdict.frozen_late += 1
                continue
            verdict.late_handlers.append(
                f"seq {r['seq']} ({_short(r['key'])}, partition {partition}): "
                f"{r.get('kind', 'async')} handler of {r['member_id']} under epoch "
                f"{r['epoch']} ran {r['started_at']:%T.%f}-{r['finished_at']:%T.%f}, past "
                f"the start of a later owner's handling at {successor:%T.%f}"
            )


def _short(key: str) -> str:
    return key if len(key) <= 24 else f"{key[:20]}...({len(key.encode())} bytes)"


def _check_poison(rows: list[Row], max_attempts: int | None, verdict: Verdict) -> None:
    """Every poison message ends in the group's dead letters, within `max_attempts`
    deliveries, with a reason; a crashing one's reason says the handler never returned."""
    for r in rows:
        verdict.poison += 1
        verdict.poison_deliveries += r["deliveries"]
        what = f"seq {r['seq']} ({r['poison']} poison, {r['deliveries']} deliveries)"
        if r["dead_at"] is None:
            verdict.poison_violations.append(f"{what}: not dead-lettered")
        elif max_attempts is not None and r["deliveries"] > max_attempts:
            verdict.poison_violations.append(
                f"{what}: delivered more often than max_attempts={max_attempts}"
            )
        elif not (r["reason"] or "").strip():
            verdict.poison_violations.append(f"{what}: dead-lettered without a reason")
        elif (
            r["poison"] == "crash"
            and "never returned" not in r["reason"]
            # A delivery that failed before the handler took the process down (its
            # journal write did not go through) is an ordinary failure.
            and r["attempts"] <= r["deliveries"]
        ):
            verdict.poison_violations.append(
                f"{what}: dead-lettered with reason {r['reason']!r}, which does not say "
                "the handler never returned"
            )


def _delays(
    produced: dict[int, Row],
    accepted: dict[int, Row],
    window: tuple[datetime, datetime] | None,
    limits: _Limits,
    verdict: Verdict,
) -> None:
    """Messages of healthy keys (every key but a poison message's own) are handled within
    `delay_bound` of being produced, unless their wait overlaps an injected fault or the
    settling after it, or began before the fault window (warm-up)."""
    assert limits.delay_bound is not None
    bound = timedelta(seconds=limits.delay_bound)
    verdict.delay_bound_s = limits.delay_bound
    for p in produced.values():
        if p.get("poison") is not None or p.get("produced_at") is None:
            continue
        r = accepted.get(p["message_id"])
        if r is None:
            continue
        a, b = p["produced_at"], r["finished_at"]
        if window is not None and a < window[0]:
            continue
        if any(s <= b and a <= e for s, e in limits.faulted):
            continue
        verdict.delay_checked += 1
        delay = b - a
        verdict.max_delay_s = max(verdict.max_delay_s, delay.total_seconds())
        if delay > bound:
            verdict.delayed.append(
                f"seq {p['seq']} ({_short(p['key'])}, partition {r['partition']}) produced at "
                f"{a:%T.%f}, handled by {b:%T.%f}: {delay.total_seconds():.2f}s, over the "
                f"bound of {limits.delay_bound:g}s"
            )


def _accepted(
    by_message: dict[int, list[Row]],
    completed: dict[int, Row],
    dead: set[int],
    verdict: Verdict,
) -> dict[int, Row]:
    """message id -> its accepted handling (`completed`: its recorded completion)."""
    accepted: dict[int, Row] = {}
    if not completed:
        # No completion triggers (a history recorded before they existed): a handling
        # whose completion took effect is never redelivered, so take each message's last.
        for mid, handlings in by_message.items():
            accepted[mid] = handlings[-1]
        return accepted
    for mid, gone in completed.items():
        if mid in dead:
            continue
        before = [r for r in by_message.get(mid, ()) if r["finished_at"] <= gone["completed_at"]]
        mine = [r for r in before if gone["proc"] is not None and r["proc"] == gone["proc"]]
        if mine:
            verdict.attributed_acks += 1
        candidates = mine or before
        if candidates:
            accepted[mid] = max(candidates, key=lambda r: (r["finished_at"], r["id"]))
    return accepted


class _EpochEnds:
    """When each epoch of each partition ended: the first change to a newer epoch."""

    def __init__(self, history: Iterable[Row]) -> None:
        self._epochs: dict[int, list[int]] = defaultdict(list)
        self._times: dict[int, list[datetime]] = defaultdict(list)
        for r in history:
            epochs = self._epochs[r["partition"]]
            if not epochs or r["epoch"] > epochs[-1]:
                epochs.append(r["epoch"])
                self._times[r["partition"]].append(r["changed_at"])

    def ended(self, partition: int, epoch: int) -> datetime | None:
        epochs = self._epochs.get(partition)
        if not epochs:
            return None
        i = bisect.bisect_right(epochs, epoch)
        return self._times[partition][i] if i < len(epochs) else None


def _check_key(key: str, handlings: list[Row], accepted_ids: set[int], verdict: Verdict) -> None:
    """Order over every handling of one key (sorted by start); overlaps among accepted ones."""
    highest: Row | None = None  # the highest seq started so far
    latest: Row | None = None  # the handling that finishes last so far
    latest_accepted: Row | None = None
    for r in handlings:
        if (
            highest is not None
            and r["seq"] < highest["seq"]
            and r["started_at"] > highest["finished_at"]
        ):
            verdict.order_violations.append(
                f"{_short(key)}: seq {r['seq']} handled at {r['started_at']:%T.%f} by "
                f"{r['member_id']} after seq {highest['seq']} finished at "
                f"{highest['finished_at']:%T.%f}"
            )
        if highest is None or r["seq"] > highest["seq"]:
            highest = r
        is_accepted = r["id"] in accepted_ids
        other = latest_accepted
        if is_accepted and other is not None and r["started_at"] < other["finished_at"]:
            verdict.concurrent_violations.append(
                f"{_short(key)}: seq {other['seq']} ({other['member_id']} epoch {other['epoch']}) "
                f"overlaps seq {r['seq']} ({r['member_id']} epoch {r['epoch']})"
            )
        elif latest is not None and r["started_at"] < latest["finished_at"]:
            verdict.fenced_overlaps += 1
        if latest is None or r["finished_at"] > latest["finished_at"]:
            latest = r
        if is_accepted and (
            latest_accepted is None or r["finished_at"] > latest_accepted["finished_at"]
        ):
            latest_accepted = r


def _leaders(rebalances: list[Row], verdict: Verdict) -> None:
    """Generations are taken in commit order, so leader epochs never go back."""
    newest: dict[str, Row] = {}
    for r in rebalances:
        last = newest.get(r["group_name"])
        if last is not None and r["leader_epoch"] < last["leader_epoch"]:
            verdict.stale_leader_writes.append(
                f"{r['group_name']}: generation {r['generation']} recorded under leader epoch "
                f"{r['leader_epoch']} after generation {last['generation']} under "
                f"{last['leader_epoch']}"
            )
        else:
            newest[r["group_name"]] = r


def _duplicates(
    by_message: dict[int, list[Row]],
    disruptions: Sequence[Disruption] | None,
    forced: dict[int, list[datetime]],
    accepted_ids: set[int],
    completed: dict[int, Row],
    verdict: Verdict,
) -> None:
    """Each repeated handling, against the one before it. `accepted_ids`: the handlings
    whose completion took effect; `completed`: each message's first recorded completion."""
    causes: Counter[str] = Counter()
    relevant = [d for d in disruptions or () if d.kind in REDELIVERY_CAUSES]
    for mid, handlings in by_message.items():
        if len(handlings) < 2:
            continue
        handlings = sorted(handlings, key=lambda r: r["started_at"])
        done = completed.get(mid)
        for first, again in itertools.pairwise(handlings):
            verdict.duplicates += 1
            if disruptions is None:
                continue
            if done is not None and done["completed_at"] <= again["started_at"]:
                verdict.unexplained_duplicates.append(
                    f"seq {again['seq']} ({again['key']}) handled again by "
                    f"{again['member_id']} epoch {again['epoch']} at "
                    f"{again['started_at']:%T.%f} after its completion (epoch {done['epoch']}, "
                    f"{done['proc']}) had been recorded at {done['completed_at']:%T.%f}"
                )
                continue
            a, b = first["started_at"] - SLACK, again["started_at"]
            cause = next(
                (d.kind for d in relevant if d.hits(first["pid"]) and d.overlaps(a, b)), None
            )
            if cause is None and any(a <= t <= b for t in forced.get(first["partition"], ())):
                cause = "forced-handoff"
            if cause is None and first["id"] not in accepted_ids:
                # Its completion never took effect: the handler was cut off (a drain
                # deadline, a lease that ran out) after its side effects were written.
                cause = "interrupted"
            if cause is None:
                verdict.unexplained_duplicates.append(
                    f"seq {first['seq']} ({_short(first['key'])}) handled by {first['member_id']} "
                    f"epoch {first['epoch']} at {first['started_at']:%T.%f} and again by "
                    f"{again['member_id']} epoch {again['epoch']} at "
                    f"{again['started_at']:%T.%f} with no fault in between"
                )
            else:
                causes[cause] += 1
    verdict.duplicate_causes = dict(causes)


def _member_pid(member: str) -> int | None:
    """Member ids are host-pid-random (consumer/member.py)."""
    try:
        return int(member.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return None


def _merge(intervals: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _ownership(
    history: list[Row],
    disruptions: Sequence[Disruption],
    window: tuple[datetime, datetime] | None,
    rows: list[Row],
    verdict: Verdict,
) -> None:
    """The longest stretch a partition had no owner (unassigned), or no working owner
    (its owner's process killed, paused or cut off), within the window."""
    if not history:
        return
    if window is None:
        last = max([h["changed_at"] for h in history] + [r["finished_at"] for r in rows])
        window = (min(h["changed_at"] for h in history), last)
    lo, hi = window
    down: dict[int, list[tuple[datetime, datetime]]] = defaultdict(list)
    for d in disruptions:
        if d.kind in OWNER_DOWN and d.pid is not None:
            down[d.pid].append((d.start, d.end or FOREVER))
    by_partition: dict[int, list[Row]] = defaultdict(list)
    for h in history:
        by_partition[h["partition"]].append(h)
    for partition, changes in by_partition.items():
        no_owner: list[tuple[datetime, datetime]] = []
        not_working: list[tuple[datetime, datetime]] = []
        for h, after in zip(changes, [*changes[1:], None], strict=True):
            a = max(h["changed_at"], lo)
            b = min(after["changed_at"] if after else hi, hi)
            if a >= b:
                continue
            if h["member_id"] is None:
                no_owner.append((a, b))
                continue
            pid = _member_pid(h["member_id"])
            for s, e in down.get(pid, ()) if pid is not None else ():
                if s < b and e > a:
                    not_working.append((max(s, a), min(e, b)))
        for a, b in _merge(no_owner):
            verdict.max_unassigned_s = max(verdict.max_unassigned_s, (b - a).total_seconds())
        for a, b in _merge(no_owner + not_working):
            if (b - a).total_seconds() > verdict.max_unowned_s:
                verdict.max_unowned_s = (b - a).total_seconds()
                verdict.max_unowned_partition = partition
                verdict.max_unowned_since = a
