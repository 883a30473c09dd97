"""Test builds only (`pgcg chaos --unsafe-drain-on-database-clock`): a coordinator that
forces a hand-off the moment the drain deadline has passed on the database's clock, as
pgcg did before drains.py. A forward step of that clock while an owner drains then starts
the next owner beside the handlers the old one still runs, which the checker must report.

`pgcg chaos --unsafe-deadline-from-transaction-start` runs it too: with the revoke deadline
counted from the start of the rebalance's transaction (in the run's database), the
database's deadline alone is how pgcg forced hand-offs before its own clock's count. The
leader's own count starts when it issued the revocation, after any lock wait, so it alone
would still keep a forced hand-off past the owners' leases (docs/chaos.md).

Run as `python -m pgcg.bench.chaos.unsafe_leader`, configured like `pgcg coordinator`
(PGCG_* variables); `pgcg coordinator` itself has no such switch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pgcg.coordinator.drains import DrainWatch


class DatabaseClockDrains(DrainWatch):
    def overdue(
        self, group: str, rows: Iterable[Mapping[str, Any]], drains: Mapping[str, float]
    ) -> set[int]:
        rows = list(rows)
        super().overdue(group, rows, drains)
        return {r["partition"] for r in rows if r["state"] == "revoking" and r["overdue"]}


def main() -> None:
    from pgcg.coordinator.runner import run_coordinator
    from pgcg.shared.settings import Settings
    from pgcg.shared.telemetry import setup_logging

    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("pgcg.chaos.unsafe").warning(
        "UNSAFE: hand-offs are forced at the drain deadline on the database's clock alone",
        extra={"action": "unsafe_drains"},
    )
    run_coordinator(settings, drains=DatabaseClockDrains())


if __name__ == "__main__":
    main()
