"""What a consumer shows the outside: a span and a duration per handler call, counters of
acked, retried and dead-lettered results, gauges (lag and oldest age of its partitions,
partitions owned, heartbeat age, handlers in flight), and its readiness for /readyz.

The per-message part is `instrument`: with tracing off it adds one type check and one
histogram record (a no-op without a MeterProvider) to each handler call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace

from pgcg.consumer import handlers
from pgcg.consumer.handlers import Handler
from pgcg.consumer.message import Message
from pgcg.consumer.readiness import AssignmentCheck
from pgcg.shared import metrics, tracing
from pgcg.shared.db import AsyncConn, connect, translated
from pgcg.shared.loops import refresh_forever
from pgcg.shared.queries import Queries

if TYPE_CHECKING:
    from pgcg.consumer.context import Context
    from pgcg.consumer.service import Consumer
    from pgcg.consumer.writer import Result

log = logging.getLogger("pgcg.consumer.observer")
Q = Queries("observer")

LAG_INTERVAL = 10.0


def group_attributes(ctx: Context) -> dict[str, Any]:
    return {
        tracing.MESSAGING_SYSTEM: tracing.SYSTEM,
        tracing.CONSUMER_GROUP: ctx.group,
        tracing.DESTINATION: ctx.topic,
    }


def instrument(handler: Handler, ctx: Context) -> Handler:
    """The handler inside a `process <topic>` span and the handler duration histogram.

    The span continues the producer's trace from the message headers and is current
    while the handler runs, so the handler's own spans, queries and logs join the trace.
    functools.wraps keeps the handler's signature visible (inspect.signature follows
    __wrapped__), so transactional-mode detection still sees the user's parameters.
    This runs once per delivery: the span's context is attached directly (not through
    the use_span generator), the handler's kind is resolved once, and constant attributes
    are built once.
    """
    attributes = group_attributes(ctx)
    failed_attributes: dict[str, dict[str, Any]] = {}
    call = _resolved(handler)

    def error_attributes(error_type: str) -> dict[str, Any]:
        if error_type not in failed_attributes:
            failed_attributes[error_type] = {**attributes, tracing.ERROR_TYPE: error_type}
        return failed_attributes[error_type]

    @functools.wraps(handler, updated=())
    async def observed(message: Message, *extra: Any) -> None:
        span = tracing.process_span(message, ctx.group) if tracing.enabled() else None
        token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
        started = time.perf_counter()
        try:
            await call(message, *extra)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "message %s handled in %.2f ms",
                    message.id,
                    (time.perf_counter() - started) * 1000,
                    extra=_message_fields(ctx, message, "message_handled"),
                )
        except BaseException as exc:
            cancelled = not isinstance(exc, Exception)
            error_type = "cancelled" if cancelled else type(exc).__qualname__
            metrics.process_duration.record(
                time.perf_counter() - started, error_attributes(error_type)
            )
            if span is not None:
                if cancelled:
                    tracing.failed(
                        span, exc, "cancelled: visibility timeout, partition lost or shutdown"
                    )
                else:
                    tracing.failed(span, exc)
                    if span.is_recording() and isinstance(exc, Exception):
                        try:
                            kind = ctx.retry.outcome(exc, message.attempt).kind
                        except ValueError:  # a broken backoff: the worker logs it
                            kind = "retry"
                        span.set_attribute("pgcg.outcome", kind)
                span.end()
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
        metrics.process_duration.record(time.perf_counter() - started, attributes)
        if span is not None:
            span.end()

    return observed


def _resolved(handler: Handler) -> Callable[..., Awaitable[Any]]:
    """What handlers.call would do for this handler, decided once: an async handler is
    awaited directly, anything else goes through handlers.call (a worker thread)."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - callable objects too
    ):
        return handler  # type: ignore[no-any-return]
    return functools.partial(handlers.call, handler)


def _message_fields(ctx: Context, message: Message, action: str) -> dict[str, Any]:
    return {
        "action": action,
        **ctx.fields,
        "partition": message.partition,
        "epoch": message.epoch,
        "message_id": message.id,
        "attempt": message.attempt,
    }


def record_results(ctx: Context, accepted: Iterable[Result]) -> None:
    """Count the results a fenced write accepted (rejected ones were never written)."""
    ok = retries = dead = 0
    for result in accepted:
        if result.ok:
            ok += 1
        elif result.dead or ctx.retry.exhausted(result.item.message.attempt):
            dead += 1
        else:
            retries += 1
    attributes = group_attributes(ctx)
    if ok:
        metrics.processed.add(ok, attributes)
    if retries:
        metrics.retried.add(retries, attributes)
    if dead:
        metrics.dead_lettered.add(dead, attributes)


class ConsumerObserver:
    """Gauges and readiness of one Consumer; `run` refreshes the lag of owned partitions."""

    def __init__(self, consumer: Consumer, *, lag_interval: float = LAG_INTERVAL) -> None:
        self.consumer = consumer
        self.ctx = consumer.ctx
        self.lag_interval = lag_interval
        self.lag: dict[int, tuple[int, float]] = {}  # partition -> (messages, oldest age s)
        self.refreshed = anyio.Event()  # set after the first lag refresh (tests wait on it)
        # Fed by the heartbeat's round trips (readiness.py); `wake` reads ctx each time:
        # an App gives the consumer its shared heartbeat only when it runs.
        self.assignment_check = AssignmentCheck(lambda: self.ctx.wake.heartbeat.set())
        self.ctx.membership.expecting = self.assignment_check
        self._conn: AsyncConn | None = None
        self._stop = [
            metrics.add_source("pgcg.consumer.lag", self._lag_messages),
            metrics.add_source("pgcg.consumer.lag.age", self._lag_age),
            metrics.add_source("pgcg.consumer.partitions", self._partitions),
            metrics.add_source("pgcg.consumer.in_flight", self._in_flight),
            metrics.add_source("pgcg.consumer.heartbeat.age", self._heartbeat_age),
        ]

    def close(self) -> None:
        for stop in self._stop:
            stop()
        self._stop = []
        if self.ctx.membership.expecting is self.assignment_check:
            self.ctx.membership.expecting = None

    # -- readiness ---------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        ctx = self.ctx
        if ctx.stopping:
            return False, "draining for shutdown"
        if not self.consumer.joined.is_set():
            return False, f"not yet joined group {ctx.group}"
        lease = ctx.membership.lease
        remaining = lease.remaining()
        if remaining <= 0:
            return False, f"lease expired {-remaining:.1f}s ago: heartbeats are failing"
        owned = {p: o.state for p, o in list(ctx.assignment.owned.items())}
        holds, why = self.assignment_check.verdict(ctx.member_id, owned)
        return holds, (
            f"member {ctx.member_id} of group {ctx.group}, {len(owned)} partition(s), "
            f"lease valid for {remaining:.1f}s: {why}"
        )

    # -- gauges (called on the collecting thread: read state, never wait) ------------------------

    def _attributes(self, partition: int | None = None) -> dict[str, Any]:
        out = group_attributes(self.ctx)
        if partition is not None:
            out[tracing.PARTITION] = str(partition)
        return out

    def _owned_lag(self) -> list[tuple[int, tuple[int, float]]]:
        owned = list(self.ctx.assignment.owned)
        lag = self.lag
        return [(p, lag.get(p, (0, 0.0))) for p in sorted(owned)]

    def _lag_messages(self) -> Iterable[metrics.Reading]:
        return [(float(n), self._attributes(p)) for p, (n, _) in self._owned_lag()]

    def _lag_age(self) -> Iterable[metrics.Reading]:
        return [(age, self._attributes(p)) for p, (_, age) in self._owned_lag()]

    def _partitions(self) -> Iterable[metrics.Reading]:
        states = [o.state for o in list(self.ctx.assignment.owned.values())]
        return [
            (float(states.count(state)), {**self._attributes(), "pgcg.state": state})
            for state in ("assigned", "revoking")
        ]

    def _in_flight(self) -> Iterable[metrics.Reading]:
        return [(float(self.ctx.running), self._attributes())]

    def _heartbeat_age(self) -> Iterable[metrics.Reading]:
        lease = self.ctx.membership.lease
        if lease.until <= 0:
            return []
        sent = lease.until - lease.session_timeout + lease.margin
        return [(max(time.monotonic() - sent, 0.0), self._attributes())]

    # -- lag refresh ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh the lag of owned partitions every lag_interval; cancel to stop."""
        await refresh_forever(self.refresh, self._drop, self.lag_interval, log)

    async def refresh(self) -> None:
        ctx = self.ctx
        owned = sorted(ctx.assignment.owned)
        if owned:
            if self._conn is None or self._conn.closed:
                self._conn = await connect(
                    ctx.dsn,
                    application_name="pgcg-observer",
                    through_pooler=ctx.through_pooler,
                    session_timeout=ctx.settings.session_timeout,
                )
            with translated(ctx.dsn):
                cur = await self._conn.execute(Q.group_lag, {"group": ctx.group})
                rows = await cur.fetchall()
            self.lag = {
                r["partition"]: (int(r["lag"]), float(r["age_s"]))
                for r in rows
                if r["partition"] in ctx.assignment.owned
            }
        else:
            self.lag = {}
        self.refreshed.set()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
