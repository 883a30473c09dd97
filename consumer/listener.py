"""One LISTEN connection for a process: each channel's notifications go to the handlers
that subscribed to it (a consumer listens on its topic's channel for new messages and on
its group's for assignment changes, shared/names.py).

A notification is a hint that saves a wait: polling backs it up, and NOTIFYs sent while
the connection was down are lost, so every subscriber hears of a reconnect and catches up.
`listening` says whether notifications can arrive right now; a subscriber that polls less
while they can (the reader) hears of every change of it (`on_change`), so it goes back to
its normal polling the moment the connection is lost.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

import anyio
from psycopg import sql

from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.errors import DatabaseUnavailable
from pgcg.shared.loops import reconnecting

log = logging.getLogger("pgcg.consumer")

Notified = Callable[[str], None]  # called with the payload; must not block


class Listener:
    """Subscribe (`subscribe`, `on_reconnect`) before `run`, which listens until cancelled."""

    def __init__(self, dsn: str, *, session_timeout: float) -> None:
        self.dsn = dsn
        self.session_timeout = session_timeout
        self._channels: dict[str, list[Notified]] = defaultdict(list)
        self._reconnected: list[Callable[[], None]] = []
        self._changed: list[Callable[[], None]] = []
        self.listening = False  # LISTENing on a live connection now

    def subscribe(self, channel: str, notified: Notified) -> None:
        self._channels[channel].append(notified)

    def on_reconnect(self, catch_up: Callable[[], None]) -> None:
        self._reconnected.append(catch_up)

    def on_change(self, changed: Callable[[], None]) -> None:
        """Call `changed()` (must not block) whenever `listening` turns on or off."""
        self._changed.append(changed)

    def _set_listening(self, listening: bool) -> None:
        if listening != self.listening:
            self.listening = listening
            for changed in self._changed:
                changed()

    @property
    def channels(self) -> list[str]:
        return sorted(self._channels)

    async def run(self) -> None:
        while True:
            conn: AsyncConn | None = None
            try:
                async for attempt in reconnecting(log, "listen"):
                    with attempt:
                        conn = await self._listening()
                self._set_listening(True)
                # NOTIFYs sent while we were away are lost: catch up now.
                for catch_up in self._reconnected:
                    catch_up()
                assert conn is not None
                with translated(self.dsn):
                    while True:
                        await self._deliver(conn)
                        # Waiting in notifies() itself wakes the process every 0.1 s (psycopg
                        # looks for interrupts), ten times a second for nothing while idle;
                        # the socket says when there is something to read. A lost connection
                        # makes it readable too, and reading then fails.
                        await anyio.wait_readable(conn.fileno())
            except DatabaseUnavailable as exc:
                log.warning("listener lost its connection: %s", exc,
                            extra={"action": "listen_lost"})  # fmt: skip
            finally:
                # Before anything awaits: from here on a notification can be missed.
                self._set_listening(False)
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.close()

    async def _deliver(self, conn: AsyncConn) -> None:
        """Hand out the notifications received, without waiting for more: those psycopg
        kept while the LISTENs ran, and what the socket has now."""
        async with contextlib.aclosing(conn.notifies(timeout=0)) as notifies:
            async for note in notifies:
                for notified in self._channels.get(note.channel, ()):
                    notified(note.payload)

    async def _listening(self) -> AsyncConn:
        conn = await connect(
            self.dsn, application_name="pgcg-listener", session_timeout=self.session_timeout
        )
        try:
            with translated(self.dsn):
                for channel in self.channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn
