"""The message a handler receives, and the claimed row the consumer keeps around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    topic: str
    partition: int
    key: str
    payload: Any
    headers: dict[str, str]
    attempt: int  # 1 on the first delivery
    enqueued_at: datetime
    # Who handles this delivery: the member and the partition epoch it holds. Useful in
    # logs and journals; a result written under a stale epoch is rejected.
    member_id: str = ""
    epoch: int = 0


@dataclass(slots=True, eq=False)
class Claimed:
    """A message this member claimed under `epoch`, waiting in memory or being handled.

    `due` is on this process's monotonic clock: the database said how far in the future
    the message becomes available, so no two hosts' wall clocks are ever compared.
    """

    message: Message
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
