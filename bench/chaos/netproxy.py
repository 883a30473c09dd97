"""A TCP proxy that can fail on demand, for putting network faults between a process and
PostgreSQL (the chaos runner gives each consumer its own).

Faults, all safe to call from any thread:
- cut(refuse_for): reset every open connection at once; optionally refuse new ones for
  a while (each new connection is reset as soon as it is accepted).
- stall(seconds): stop forwarding bytes in both directions while keeping every socket
  open, as a congested or black-holed link does; bytes read meanwhile are delivered
  when the stall ends (a statement sent during a stall still runs, late).
- blackhole(seconds): drop every byte in both directions, sockets kept open and never
  reset, as a link whose packets vanish does; a new connection is accepted but gets no
  answer (its startup packet goes nowhere). When it ends, every connection that lost a
  byte is reset (its stream is corrupt, as the peer's kernel would have given up on it).
  A peer only learns of it by its own timeouts.
- heal(): end a refusal, stall or black hole early.

All proxies share one asyncio loop on a daemon thread (ProxyHub), so a runner can hold a
dozen of them without a thread per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger("pgcg.netproxy")

T = TypeVar("T")
CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, like a dropped link seen from the far end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ProxyHub:
    """The event loop thread every NetProxy runs on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pgcg-netproxy", daemon=True)
        self._thread.start()
        self.proxies: list[NetProxy] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def proxy(self, upstream_host: str, upstream_port: int, name: str = "proxy") -> NetProxy:
        proxy = NetProxy(self, upstream_host, upstream_port, name)
        self.call(proxy._start())
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        with contextlib.suppress(RuntimeError, TimeoutError):
            self.call(self._cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> ProxyHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetProxy:
    def __init__(self, hub: ProxyHub, upstream_host: str, upstream_port: int, name: str) -> None:
        self.hub = hub
        self.name = name
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.connections = 0  # accepted so far, for tests and reports
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refuse_until = 0.0
        self._stall_handle: asyncio.TimerHandle | None = None
        self._dropping = False
        self._clear = asyncio.Event()  # set while no black hole is in effect
        self._clear.set()
        self._blackhole_handle: asyncio.TimerHandle | None = None
        # Connections that lost bytes to a black hole, reset when it ends.
        self._tainted: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()

    def dsn_for(self, dsn: str) -> str:
        """`dsn` (URL or keyword form) connecting through this proxy, all else kept.

        The proxy's address goes in `hostaddr`, not `host`: libpq connects there but still
        checks the server's certificate against the real host name (sslmode=verify-full),
        and the password, sslmode, sslrootcert and the rest are carried over as parsed.
        """
        host = conninfo_to_dict(dsn).get("host") or "127.0.0.1"
        return make_conninfo(dsn, host=host, hostaddr="127.0.0.1", port=str(self.port))

    # -- faults (any thread) ---------------------------------------------------------------

    def cut(self, refuse_for: float = 0.0) -> int:
        """Reset every open connection; refuse new ones for `refuse_for` seconds."""
        return self.hub.call(self._cut(refuse_for))

    def stall(self, seconds: float) -> None:
        """Hold every byte in both directions for `seconds`, sockets kept open."""
        self.hub.call(self._stall(seconds))

    def blackhole(self, seconds: float) -> None:
        """Drop every byte in both directions for `seconds`, with no reset."""
        self.hub.call(self._blackhole(seconds))

    def heal(self) -> None:
        self.hub.call(self._heal())

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is already gone
            self.hub.call(self._close())

    # -- on the loop -----------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self, refuse_for: float) -> int:
        self._refuse_until = time.monotonic() + refuse_for
        victims = list(self._open)
        for client, upstream in victims:
            _reset(client)
            if upstream is not None:
                _reset(upstream)
        self._open.clear()
        log.info("%s: cut %s connections", self.name, len(victims))
        return len(victims)

    async def _stall(self, seconds: float) -> None:
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._flowing.clear()
        self._stall_handle = asyncio.get_running_loop().call_later(seconds, self._flowing.set)

    async def _blackhole(self, seconds: float) -> None:
        if self._blackhole_handle is not None:
            self._blackhole_handle.cancel()
        self._dropping = True
        self._clear.clear()
        self._blackhole_handle = asyncio.get_running_loop().call_later(seconds, self._end_blackhole)

    def _end_blackhole(self) -> None:
        self._dropping = False
        self._clear.set()
        self._blackhole_handle = None
        victims, self._tainted = self._tainted, set()
        for pair in victims:
            self._open.discard(pair)
            for w in pair:
                if w is not None:
                    _reset(w)
        if victims:
            log.info("%s: black hole over, reset %s connections", self.name, len(victims))

    async def _heal(self) -> None:
        self._refuse_until = 0.0
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None
        self._flowing.set()
        if self._blackhole_handle is not None:
            self._blackhole_handle.cancel()
        if self._dropping:
            self._end_blackhole()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._heal()
        await self._cut(0.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if time.monotonic() < self._refuse_until:
            _reset(writer)
            return
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._open.add(pair)
        if self._dropping:
            # Its packets would never reach the server: swallow them until the end.
            self._tainted.add(pair)
            try:
                while await reader.read(CHUNK):
                    pass
            except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                self._open.discard(pair)
                self._tainted.discard(pair)
                if not writer.is_closing():
                    _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._open.discard(pair)
            _reset(writer)
            return
        if pair not in self._open:  # cut while we were connecting
            _reset(up_writer)
            return
        self._open.discard(pair)
        pair = (writer, up_writer)
        self._open.add(pair)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, pair), self._pump(up_reader, writer, pair)
            )
        except asyncio.CancelledError:
            # The hub is closing. Returning (rather than re-raising) keeps asyncio's stream
            # callback from logging the cancelled connection task as an error.
            pass
        finally:
            self._open.discard(pair)
            for w in (writer, up_writer):
                if not w.is_closing():
                    w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None],
    ) -> None:
        """Copy one direction until EOF or an error; then close the other side too, after
        delivering what was already read (a closed client's last statement still runs)."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if self._dropping and pair in self._open:
                    self._tainted.add(pair)
                    if data:
                        continue  # dropped, and the connection with it (reset at the end)
                    # EOF: a FIN would not cross a black hole either; the reset will.
                    await self._clear.wait()
                    break
                if pair in self._tainted:
                    continue  # lost bytes before: dead until the black hole's reset
                await self._flowing.wait()
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()
