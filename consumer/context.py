"""The state one consumer process shares between its loops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pgcg.consumer.assignment import Assignment
from pgcg.consumer.handlers import RetryPolicy
from pgcg.consumer.member import Membership
from pgcg.consumer.scheduler import KeyScheduler
from pgcg.shared.loops import Signal
from pgcg.shared.settings import Settings

# How long one statement of the consumer's reader or writer may go unanswered, at least.
MIN_ROUND_TRIP_BOUND = 10.0


@dataclass
class Wakeups:
    fetch: Signal = field(default_factory=Signal)  # new rows may be there, or room freed up
    dispatch: Signal = field(default_factory=Signal)  # keys may be ready, or slots free
    heartbeat: Signal = field(default_factory=Signal)  # assignments may have changed
    release: Signal = field(default_factory=Signal)  # a revoked partition may be drained
    acks: Signal = field(default_factory=Signal)  # results wait to be written
    parked: Signal = field(default_factory=Signal)  # parked messages may be ready to load


@dataclass
class Context:
    settings: Settings
    dsn: str
    membership: Membership
    scheduler: KeyScheduler
    assignment: Assignment
    retry: RetryPolicy
    wake: Wakeups = field(default_factory=Wakeups)
    stopping: bool = False
    running: int = 0  # handlers executing right now
    # Where connections go (shared/pooler.py), decided when the consumer starts: the
    # pooler prepares nothing, and LISTEN needs session_dsn (None: poll only).
    through_pooler: bool = False
    session_dsn: str | None = None
    # Whether a listener (ours or an App's) is LISTENing now: while it is, a new message
    # wakes the reader, which then only needs a slow safety poll.
    listening: Callable[[], bool] = lambda: False

    @property
    def group(self) -> str:
        return self.membership.group

    @property
    def topic(self) -> str:
        return self.membership.topic

    @property
    def member_id(self) -> str:
        return self.membership.member_id

    @property
    def fields(self) -> dict[str, Any]:
        return self.membership.fields

    @property
    def round_trip_bound(self) -> float:
        """How long a read or a write may go unanswered before it is given up, its
        connection dropped and the statement made again. Keepalives and tcp_user_timeout
        find a dead network; they cannot see a server process that has stopped answering
        on a live connection (seen: a backend hung for good), and the loop would then wait
        forever while the heartbeat, on its own connection, keeps the member and its
        partitions. Generous, because a statement can be slow on a loaded server, and
        cutting one off only costs a retry: every read is read-only but the adopt, which
        charges its deliveries once, and a round of writes may be written twice."""
        return max(MIN_ROUND_TRIP_BOUND, 3 * self.settings.session_timeout)

    def params(self, **extra: Any) -> dict[str, Any]:
        """The (group, topic, member) every fenced statement carries, plus its own values."""
        return {"group": self.group, "topic": self.topic, "member": self.member_id, **extra}
