"""A plain `def` handler that blocks until the test lets it go (for tests/test_stuck_threads.py).

It runs in a worker thread, which cancellation cannot stop: it announces itself with a file
in $PGCG_TEST_DIR and returns only once the test creates `release` there.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pgcg.consumer.message import Message


def block(message: Message) -> None:
    folder = Path(os.environ["PGCG_TEST_DIR"])
    (folder / f"started-{message.partition}").write_text(str(message.id))
    released = threading.Event()
    # A file is the only way the test can reach into this process: poll for it.
    while not (folder / "release").exists():
        released.wait(0.02)


async def stubborn(message: Message) -> None:
    """An async handler that ignores its cancellation (catches it and goes on waiting)
    until the test lets it go: as stuck as a thread, for pgcg's purposes."""
    import anyio

    folder = Path(os.environ["PGCG_TEST_DIR"])
    (folder / f"started-{message.partition}").write_text(str(message.id))
    while not (folder / "release").exists():
        try:
            await anyio.sleep(0.02)
        except anyio.get_cancelled_exc_class():
            continue  # the mistake this handler stands for
