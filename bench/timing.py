"""The handler of the soak and latency benches: notes when each message's handler started.

Each consumer process appends fixed-size records (message id, the producer's batch number,
handler start as unix time) to `$PGCG_BENCH_TIMING_DIR/<pid>.bin`, written out every 0.2 s
by a thread and at exit. The bench reads them while the run goes on and
pairs each with its batch's commit time (bench/paced.py): latency from the commit of an
enqueue to the start of its handler, on one host's clock.

PGCG_BENCH_WORK_MS makes the handler sleep that long after noting its start.
"""

from __future__ import annotations

import atexit
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import anyio

TIMING_DIR_ENV = "PGCG_BENCH_TIMING_DIR"
WORK_MS_ENV = "PGCG_BENCH_WORK_MS"
RECORD = struct.Struct("<qqd")  # message id, producer batch, handler start (time.time())
FLUSH_EVERY = 0.2

HANDLER = "pgcg.bench.timing:record"


class _Recorder:
    """Buffers records; a daemon thread writes them out every FLUSH_EVERY seconds, so the
    last ones of a burst do not wait for the next message."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.lock = threading.Lock()
        self._file: Any = None
        self._flusher: threading.Thread | None = None

    def add(self, message_id: int, batch: int, started: float) -> None:
        with self.lock:
            self.buffer += RECORD.pack(message_id, batch, started)
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_often, daemon=True)
            self._flusher.start()

    def _flush_often(self) -> None:
        while True:
            time.sleep(FLUSH_EVERY)
            self.flush()

    def flush(self) -> None:
        with self.lock:
            data = bytes(self.buffer)
            self.buffer.clear()
        if not data:
            return
        if self._file is None:
            folder = os.environ.get(TIMING_DIR_ENV)
            if not folder:
                return
            self._file = open(Path(folder) / f"{os.getpid()}.bin", "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
        # One write of whole records: the reader takes whole records only.
        self._file.write(data)


_RECORDER = _Recorder()
_WORK = float(os.environ.get(WORK_MS_ENV) or 0) / 1000
atexit.register(_RECORDER.flush)


async def record(message: Any) -> None:
    _RECORDER.add(message.id, int(message.payload["batch"]), time.time())
    if _WORK:
        await anyio.sleep(_WORK)


def read_records(path: Path, offset: int) -> tuple[list[tuple[int, int, float]], int]:
    """Whole records of `path` from `offset`; returns them and the next offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    usable = len(data) - len(data) % RECORD.size
    return list(RECORD.iter_unpack(data[:usable])), offset + usable
