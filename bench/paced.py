"""A producer at a fixed rate, for the soak and latency benches.

One thread and connection: by time t it has sent rate * t messages, in one enqueue per
tick (a batch of what fell due since the last one; a single message at low rates, a bigger
batch after a slow statement, up to MAX_BATCH). Each batch's commit time (time.time() when
the enqueue returned) is noted by batch number; payloads carry that number, so a handler's
start can be paired with the commit of its enqueue.
"""

from __future__ import annotations

import threading
import time

from pgcg.shared.db import connect_sync
from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync

MAX_BATCH = 1_000
TICK = 0.01


class PacedProducer:
    def __init__(self, dsn: str, topic: str, rate: float, keys: int) -> None:
        if rate <= 0 or keys < 1:
            raise ValueError("rate must be > 0 and keys >= 1")
        self.dsn = dsn
        self.topic = topic
        self.rate = rate
        self.keys = keys
        self.commits: list[float] = []  # by batch number: when its enqueue returned
        self.sizes: list[int] = []  # by batch number
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sending (again: no-op); raises what made the producer fail, if anything."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with connect_sync(self.dsn) as conn:
                started = time.monotonic()
                while not self._stop.is_set():
                    due = int(self.rate * (time.monotonic() - started)) - self.sent
                    if due <= 0:
                        wait = (self.sent + 1) / self.rate - (time.monotonic() - started)
                        self._stop.wait(min(max(wait, 0.0), TICK))
                        continue
                    count = min(due, MAX_BATCH)
                    batch = len(self.commits)
                    messages = [
                        OutgoingMessage(f"key-{n % self.keys}", {"seq": n, "batch": batch})
                        for n in range(self.sent, self.sent + count)
                    ]
                    enqueue_many_sync(conn, self.topic, messages)
                    self.sizes.append(count)
                    self.commits.append(time.time())
                    self.sent += count
        except BaseException as exc:  # re-raised by stop()
            self.error = exc
