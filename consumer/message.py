"""The message a handler receives, and the claimed row the consumer keeps around it."""

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

    id: int
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


@dataclass(slots=True, eq=False)
class Claimed:
    """A message this member claimed under `epoch`, waiting in memory or being handled.

    `due` is on this process's monotonic clock: the database said how far in the future
    the message becomes available, so no two hosts' wall clocks are ever compared.
    """

    message: Message[Any]
    epoch: int
    due: float
    progress_deadline: float = field(default=0.0)

    @property
    def id(self) -> int:
        return self.message.id

    @property
    def key(self) -> str:
        return self.message.key

    @property
    def partition(self) -> int:
        return self.message.partition
