"""Process entry point for `pgcg coordinator`: telemetry, the HTTP endpoint, the loops."""

from __future__ import annotations

import anyio

from pgcg.coordinator.drains import DrainWatch
from pgcg.coordinator.observer import CoordinatorObserver
from pgcg.coordinator.service import Coordinator
from pgcg.shared import taskdump
from pgcg.shared.health import LoopWatch, serving
from pgcg.shared.settings import Settings
from pgcg.shared.telemetry import setup_telemetry


def run_coordinator(
    settings: Settings, *, groups: list[str] | None = None, drains: DrainWatch | None = None
) -> None:
    """`drains`: what decides when a drain deadline has passed (default: both clocks,
    drains.py); a chaos run's unsafe variant hands in its own."""
    telemetry = setup_telemetry(settings, "pgcg-coordinator")

    async def main() -> None:
        coordinator = Coordinator(settings, groups=groups, drains=drains)
        observer = CoordinatorObserver(coordinator)
        # Past a leader timeout without running, a standby has taken over anyway.
        watch = LoopWatch(settings.leader_timeout)
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
                    await coordinator.run()
                    tg.cancel_scope.cancel()
        finally:
            observer.close()

    taskdump.install()  # from the start: a connect or join that hangs shows too
    anyio.run(main)
