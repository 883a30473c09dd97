"""Process entry point for `pgcg consumer`: telemetry, the HTTP endpoint, and a member
(optionally with a coordinator in the same process)."""

from __future__ import annotations

import gc

import anyio

from pgcg.consumer.app import App
from pgcg.consumer.handlers import Handler
from pgcg.consumer.observer import ConsumerObserver
from pgcg.consumer.service import Consumer
from pgcg.shared import taskdump
from pgcg.shared.health import LoopWatch, serving
from pgcg.shared.settings import Settings
from pgcg.shared.telemetry import setup_telemetry


def run_consumer(
    settings: Settings,
    *,
    group: str,
    topic: str,
    handler: Handler,
    embedded_coordinator: bool = False,
) -> None:
    telemetry = setup_telemetry(settings, "pgcg-consumer")

    async def run(consumer: Consumer) -> None:
        if not embedded_coordinator:
            await consumer.run()
            return
        from pgcg.coordinator.observer import CoordinatorObserver
        from pgcg.coordinator.service import Coordinator

        coordinator = Coordinator(settings, groups=[group])
        coordinator_observer = CoordinatorObserver(coordinator)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(coordinator.run_until_stopped)
                async with anyio.create_task_group() as observing:
                    observing.start_soon(coordinator_observer.run)
                    await consumer.run()
                    observing.cancel_scope.cancel()
                await coordinator.stop()
        finally:
            coordinator_observer.close()

    async def main() -> None:
        consumer = Consumer(settings, group=group, topic=topic, handler=handler)
        observer = ConsumerObserver(consumer)
        # A loop that has not run for a whole session timeout has lost its membership
        # anyway: past that, restarting the process is the way back.
        watch = LoopWatch(settings.session_timeout)
        try:
            with serving(
                settings.http_port,
                ready=observer.ready,
                registry=telemetry.registry,
                alive=watch.alive,
            ):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch.run)
                    tg.start_soon(observer.run)
                    await run(consumer)
                    tg.cancel_scope.cancel()
        finally:
            observer.close()

    taskdump.install()  # from the start: a connect or join that hangs shows too
    _freeze_startup_objects()
    anyio.run(main)


def run_app(app: App) -> None:
    """`pgcg worker`: an App's handlers in this process, with telemetry, the HTTP endpoint
    and SIGTERM/SIGINT draining. Each handler's group is observed as `pgcg consumer`
    observes its one (gauges by group, readiness: every handler holds its assignment)."""
    settings = app.settings
    telemetry = setup_telemetry(settings, "pgcg-worker")

    async def main() -> None:
        observers = [ConsumerObserver(consumer) for consumer in app.consumers]
        watch = LoopWatch(settings.session_timeout)
        try:
            with serving(
                settings.http_port,
                ready=lambda: _all_ready(app, observers),
                registry=telemetry.registry,
                alive=watch.alive,
            ):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch.run)
                    for observer in observers:
                        tg.start_soon(observer.run)
                    await app.run()
                    tg.cancel_scope.cancel()
        finally:
            for observer in observers:
                observer.close()

    taskdump.install()  # from the start: a connect or join that hangs shows too
    _freeze_startup_objects()
    anyio.run(main)


def _all_ready(app: App, observers: list[ConsumerObserver]) -> tuple[bool, str]:
    ready, why = app.ready
    if not ready:
        return ready, why
    verdicts = [observer.ready() for observer in observers]
    return all(ok for ok, _ in verdicts), "; ".join(why for _, why in verdicts)


def _freeze_startup_objects() -> None:
    """Keep what start-up made (modules, the SDK, the handler's code) out of the garbage
    collector's full passes: those walk every object, and a busy consumer makes one every
    few thousand messages. Only in processes pgcg owns: an application embedding a
    consumer keeps its collector as it set it. Start-up's own garbage is collected first,
    or it would be kept for good."""
    gc.collect()
    gc.freeze()
