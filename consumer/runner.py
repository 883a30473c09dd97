"""Process entry point for `pgcg consumer`: run a member (and optionally a coordinator)."""

from __future__ import annotations

import anyio

from pgcg.consumer.handlers import Handler
from pgcg.consumer.service import Consumer
from pgcg.shared.settings import Settings


def run_consumer(
    settings: Settings,
    *,
    group: str,
    topic: str,
    handler: Handler,
    embedded_coordinator: bool = False,
) -> None:
    async def main() -> None:
        consumer = Consumer(settings, group=group, topic=topic, handler=handler)
        if not embedded_coordinator:
            await consumer.run()
            return
        from pgcg.coordinator.service import Coordinator

        coordinator = Coordinator(settings, groups=[group])
        async with anyio.create_task_group() as tg:
            tg.start_soon(coordinator.run_until_stopped)
            await consumer.run()
            await coordinator.stop()

    anyio.run(main)
