"""The message a handler receives, and the item the consumer keeps around it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Message(Generic[P]):
    """One delivery. `Message[Order]` in a handler's signature declares the payload's type:
    the payload is then validated into an `Order` (see consumer/payloads.py)."""

    id: int  # unique within its topic: offset * 1024 + partition
    topic: str
    partition: int
    key: str
    payload: P
    headers: dict[str, str]
    attempt: int  # 1 on the first delivery
    enqueued_at: datetime
    # Who handles this delivery: the member and the partition epoch it holds. Useful in
    # logs and journals; a result written under a stale epoch is rejected.
    member_id: str = ""
    epoch: int = 0
    offset: int = 0  # the message's place in its partition (dense, like a Kafka offset)
    group: str = ""  # the consumer group this delivery is for
    # Set by the consumer for each delivery (consumer/progress.py); None outside a consumer.
    reporter: Callable[[float, str], Awaitable[None]] | None = field(
        default=None, repr=False, compare=False
    )

    async def progress(self, percent: float, text: str = "") -> None:
        """Report how far handling got: `percent` from 0 to 100 and a short text.

        Each report gives the handler another PGCG_VISIBILITY_TIMEOUT seconds before it is
        treated as stuck (cancelled and retried), and shows in `pgcg status`: a long
        handler reports well within that timeout. Reports are cheap: they are written to
        the database at most once a second per message, in the background. Without a
        consumer (a handler called from a unit test) this does nothing.
        """
        if self.reporter is not None:
            await self.reporter(percent, text)


def message_id(offset: int, partition: int) -> int:
    """The id users see: unique within a topic, without a second sequence."""
    return offset * 1024 + partition


@dataclass(slots=True, eq=False)
class Item:
    """A message this member holds in memory under `epoch`: read from the log (`parked_id`
    None: its place is `(tick, offset)` in `slot`), or from the group's parked queue.

    `due` is on this process's monotonic clock: the database said how far in the future
    the message becomes available, so no two hosts' wall clocks are ever compared.
    """

    message: Message[Any]
    epoch: int
    due: float
    tick: int = 0
    slot: int = 0
    parked_id: int | None = None
    # The batch the row was read in (its predecessor tick): what the group's position
    # waits for while this message is unfinished. None for parked messages.
    a_tick: int | None = None
    # Set while the writer parks a log message that keeps running: its result then goes
    # to the parked row.
    parking: bool = False
    # Dropped with its partition (lost): it must not start any more, and its result,
    # if one comes, must not move what a later holding of the partition (maybe under the
    # same epoch, after the lease came back) keeps in memory.
    void: bool = False
    size: int = 0  # bytes of payload and headers, as the database measured them
    # A parked message charged for a crash: it was running when its consumer died, and it
    # may be what killed it. Such messages run one at a time (scheduler.py), so a crash
    # charges the one that caused it rather than every message running beside it.
    suspect: bool = False
    progress_deadline: float = field(default=0.0)

    @property
    def id(self) -> int:
        return self.message.id

    @property
    def uid(self) -> int:
        """Identity in memory: the message id for a log message, minus the parked id for a
        parked one (a message can be both for a moment, while it is being parked)."""
        return self.message.id if self.parked_id is None else -self.parked_id

    @property
    def key(self) -> str:
        return self.message.key

    @property
    def partition(self) -> int:
        return self.message.partition

    @property
    def offset(self) -> int:
        return self.message.offset

    @property
    def parked(self) -> bool:
        return self.parked_id is not None

    @property
    def order(self) -> tuple[int, int, int]:
        """A key's order: its parked messages first (they always come before the key's
        messages still in the log), by parked id; then log messages by position."""
        if self.parked_id is not None:
            return (0, self.parked_id, 0)
        return (1, self.tick, self.offset)
