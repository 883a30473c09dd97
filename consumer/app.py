"""The application object: several handlers, each a member of its own group, in one
process, sharing one heartbeat (one connection, one round trip per interval renewing every
member: heartbeat.py), one LISTEN connection (listener.py) and one pool for transactional
handlers' transactions, embeddable in an asyncio program.

    app = App()

    @app.handler(topic="orders", group="billing", concurrency=20, max_attempts=5)
    async def bill(message: Message[Order]) -> None: ...

    async with app.running():   # or: await app.start() ... await app.stop()
        ...                     # the rest of the service

`pgcg worker module:app` runs one from the command line (with its signals, health
endpoint and telemetry, as `pgcg consumer` does for a single handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from psycopg_pool import AsyncConnectionPool

from pgcg.consumer.heartbeat import Heartbeat
from pgcg.consumer.listener import Listener
from pgcg.consumer.outcomes import Backoff, ExceptionTypes
from pgcg.consumer.rebalance import PartitionsCallback
from pgcg.consumer.service import Consumer
from pgcg.shared import names, pooler, taskdump
from pgcg.shared.db import AsyncConn, open_pool
from pgcg.shared.errors import ConfigError
from pgcg.shared.settings import Settings

log = logging.getLogger("pgcg.consumer")

H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Registration:
    handler: Callable[..., Any]
    topic: str
    group: str
    options: dict[str, Any] = field(default_factory=dict)
    concurrency: int | None = None


class App:
    """Handlers registered with `@app.handler(...)`, run together.

    `dsn` defaults to PGCG_DATABASE_URL; `settings` to every PGCG_* variable.
    `coordinator=True` also runs a coordinator for the app's groups in this process
    (small deployments; otherwise run `pgcg coordinator` beside it).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        settings: Settings | None = None,
        coordinator: bool = False,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        # `pgcg worker` gives its own (environment and flags) to an app built without any.
        self.settings_given = settings is not None
        self._dsn = dsn
        self._coordinator = coordinator
        self._registered: list[_Registration] = []
        self._consumers: list[Consumer] = []
        self._running = False
        self._stopping = False
        self._ready = anyio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop_coordinator: Callable[[], Any] | None = None

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether every handler joined its group and none is stopping (readiness)."""
        if self._stopping:
            return False, "draining for shutdown"
        if not self._ready.is_set():
            return False, "not every handler has joined its group yet"
        return True, f"{len(self._consumers)} handlers running"

    @property
    def dsn(self) -> str:
        return self._dsn or self.settings.dsn()

    # -- registration ------------------------------------------------------------------------

    def handler(
        self,
        *,
        topic: str,
        group: str,
        concurrency: int | None = None,
        max_attempts: int | None = None,
        retry_on: ExceptionTypes = (Exception,),
        dead_letter_on: ExceptionTypes = (),
        backoff: Backoff | None = None,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
    ) -> Callable[[H], H]:
        """Register a handler as a member of `group`, which consumes `topic`.

        `concurrency` (default PGCG_CONCURRENCY) handlers run at once; `max_attempts`
        (default PGCG_MAX_ATTEMPTS), `retry_on`, `dead_letter_on` and `backoff` (seconds
        before the next delivery, given the attempt that failed; default exponential with
        jitter) decide what becomes of a failure. `on_assigned(partitions)`,
        `on_revoked(partitions)` (drained, before the hand-over) and `on_lost(partitions)`
        hear of rebalances; an exception in one is logged and ignored.
        """
        names.topic_name(topic)
        names.group_name(group)
        if any(r.group == group for r in self._registered):
            raise ConfigError(f"group {group!r} has a handler already: one handler per group")
        if concurrency is not None and not 1 <= concurrency <= 10_000:
            raise ConfigError(f"concurrency must be from 1 to 10000, not {concurrency!r}")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError(f"max_attempts counts deliveries from 1, not {max_attempts!r}")
        options = {
            "max_attempts": max_attempts,
            "retry_on": tuple(retry_on),
            "dead_letter_on": tuple(dead_letter_on),
            "backoff": backoff,
            "on_assigned": on_assigned,
            "on_revoked": on_revoked,
            "on_lost": on_lost,
        }

        def register(handler: H) -> H:
            self._registered.append(_Registration(handler, topic, group, options, concurrency))
            return handler

        return register

    # -- running -----------------------------------------------------------------------------

    @property
    def consumers(self) -> list[Consumer]:
        """One member per handler (built on first use: `pgcg worker` observes them before
        they run)."""
        if not self._consumers:
            if not self._registered:
                raise ConfigError("the app has no handlers: register one with @app.handler(...)")
            dsn = self.dsn
            self._consumers = [
                Consumer(
                    self.settings
                    if r.concurrency is None
                    else self.settings.model_copy(update={"concurrency": r.concurrency}),
                    group=r.group,
                    topic=r.topic,
                    handler=r.handler,
                    dsn=dsn,
                    **r.options,
                )
                for r in self._registered
            ]
        return self._consumers

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Run every handler until stop() (or SIGTERM/SIGINT): each drains its in-flight
        messages and leaves its group."""
        consumers = self.consumers
        if self._running:
            raise ConfigError("the app is running already")
        if self._stopping:
            return
        self._running = True
        dsn = self.dsn
        route = await pooler.route(self.settings, dsn)
        # Every member's heartbeat in one round trip on one connection (heartbeat.py).
        heartbeat = Heartbeat(
            dsn,
            session_timeout=self.settings.session_timeout,
            interval=self.settings.heartbeat_interval,
            application_name=Heartbeat.name_for([c.ctx.group for c in consumers]),
        )
        heartbeat.through_pooler = route.pooled
        for consumer in consumers:
            consumer.share_heartbeat(heartbeat)
        listener = None
        if self.settings.listen and route.session_dsn is not None:
            listener = Listener(route.session_dsn, session_timeout=self.settings.session_timeout)
            for consumer in consumers:
                consumer.external_listener = True
                consumer.listen_on(listener)
        transactional = [c for c in consumers if c.transactional is not None]
        pool = _SharedPool(
            dsn,
            sum(c.ctx.settings.concurrency for c in transactional),
            route.pooled,
            self.settings.session_timeout,
        )
        for consumer in transactional:
            assert consumer.transactional is not None
            consumer.transactional.shared_pool = pool.get
        try:
            await self._run_all(dsn, install_signal_handlers, heartbeat, listener)
        except BaseExceptionGroup as group:
            # One handler that could not start (an unknown topic, a refused connection):
            # its own error says it best, not a nest of task groups.
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close()
                await heartbeat.close()

    async def _run_all(
        self,
        dsn: str,
        install_signal_handlers: bool,
        heartbeat: Heartbeat,
        listener: Listener | None,
    ) -> None:
        async with anyio.create_task_group() as tg:
            helpers = anyio.CancelScope()
            coordinator = None
            if self._coordinator:
                from pgcg.coordinator.service import Coordinator

                coordinator = Coordinator(
                    self.settings, groups=[r.group for r in self._registered], dsn=dsn
                )
                tg.start_soon(coordinator.run_until_stopped)
            tg.start_soon(self._helpers, helpers, install_signal_handlers, heartbeat, listener)
            async with anyio.create_task_group() as members:
                for consumer in self._consumers:
                    members.start_soon(
                        functools.partial(consumer.run, install_signal_handlers=False)
                    )
            helpers.cancel()
            if coordinator is not None:
                await coordinator.stop()

    async def _helpers(
        self,
        scope: anyio.CancelScope,
        signals: bool,
        heartbeat: Heartbeat,
        listener: Listener | None,
    ) -> None:
        # Cancelled once every member has left: the heartbeat goes on while they drain.
        with scope:
            async with anyio.create_task_group() as tg:
                if signals:
                    tg.start_soon(self._signals)
                    taskdump.install()
                tg.start_soon(heartbeat.run)
                if listener is not None:
                    tg.start_soon(listener.run)
                tg.start_soon(self._watch_ready)

    async def _watch_ready(self) -> None:
        # A consumer stopped before it joined never joins: the helpers' scope ends this.
        for consumer in self._consumers:
            await consumer.joined.wait()
        self._ready.set()

    async def start(self) -> None:
        """Start running in the background (asyncio); returns once every handler joined
        its group. Raises what stopped the app if it could not start."""
        if self._task is not None:
            raise ConfigError("the app was started already")
        self._task = asyncio.get_running_loop().create_task(
            self.run(install_signal_handlers=False), name="pgcg app"
        )
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._task.done():
            self._task.result()  # the error that ended it, if any

    async def stop(self) -> None:
        """Stop gracefully: in-flight messages finish (up to the drain deadline),
        partitions are released, members leave; after start(), waits for all that (run()
        returns by itself when it was called directly). Safe before start() and twice."""
        self._stopping = True
        self._stop_consumers()
        if self._task is not None:
            task = self._task
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[App]:
        """`async with app.running():` the handlers run inside the block."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def _stop_consumers(self) -> None:
        for consumer in self._consumers:
            consumer.stop()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                log.info("received %s: draining", signal.Signals(signum).name,
                         extra={"action": "shutdown_requested"})  # fmt: skip
                self._stopping = True
                self._stop_consumers()


class _SharedPool:
    """One pool of connections for the transactional handlers of every group, opened when
    the first one needs it: as large as their concurrencies together."""

    def __init__(self, dsn: str, size: int, through_pooler: bool, session_timeout: float) -> None:
        self._dsn = dsn
        self._size = size
        self._through_pooler = through_pooler
        self._session_timeout = session_timeout
        self._pool: AsyncConnectionPool[AsyncConn] | None = None
        self._lock = anyio.Lock()

    async def get(self) -> AsyncConnectionPool[AsyncConn]:
        async with self._lock:
            if self._pool is None:
                self._pool = await open_pool(
                    self._dsn, min_size=min(self._size, 4), max_size=self._size,
                    name="pgcg-handler-tx", through_pooler=self._through_pooler,
                    session_timeout=self._session_timeout,
                )  # fmt: skip
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
