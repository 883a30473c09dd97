"""Where the CPU went during a drain: consumer processes, PostgreSQL, the bench itself,
and everything else on the host (a busy host makes every number lower; this says by how
much). Linux /proc only; elsewhere the meter reports nothing.

PostgreSQL's share is the postmaster's live children plus its reaped ones (cutime), so
short-lived autovacuum workers are counted too.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may itself contain spaces and parentheses.
    return text.rsplit(")", 1)[1].split()


def _process_seconds(pid: int, *, reaped_children: bool = False) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def _children_of(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                out.append(int(entry.name))
    return out


def _host_busy_seconds() -> float:
    """CPU seconds the whole host spent not idle, since boot."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _TICK


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM): with a backlog, a consumer's
    memory with its prefetch full."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Sample:
    at: float
    consumers: float
    postgres: float | None
    bench: float
    host: float
    consumers_peak_rss_mb: list[float | None]


class CpuMeter:
    def __init__(self, consumer_pids: list[int], postmaster_pid: int | None) -> None:
        self.consumer_pids = consumer_pids
        self.postmaster_pid = postmaster_pid
        self.available = Path("/proc/stat").exists()

    def sample(self) -> Sample | None:
        if not self.available:
            return None
        postgres = None
        if self.postmaster_pid is not None:
            postgres = _process_seconds(self.postmaster_pid, reaped_children=True) + sum(
                _process_seconds(pid) for pid in _children_of(self.postmaster_pid)
            )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return Sample(
            at=time.perf_counter(),
            consumers=sum(_process_seconds(pid) for pid in self.consumer_pids),
            postgres=postgres,
            bench=usage.ru_utime + usage.ru_stime,
            host=_host_busy_seconds(),
            consumers_peak_rss_mb=[peak_rss_mb(pid) for pid in self.consumer_pids],
        )

    @staticmethod
    def report(
        start: Sample | None, end: Sample | None, messages: int | None = None
    ) -> dict[str, Any] | None:
        if start is None or end is None:
            return None
        wall = end.at - start.at
        consumers = end.consumers - start.consumers
        bench = end.bench - start.bench
        host = end.host - start.host
        postgres = None if start.postgres is None else end.postgres - start.postgres  # type: ignore[operator]
        ours = consumers + bench + (postgres or 0.0)
        out = {
            "wall_s": round(wall, 3),
            "cores": os.cpu_count(),
            "consumers_s": round(consumers, 2),
            "postgres_s": None if postgres is None else round(postgres, 2),
            "bench_s": round(bench, 2),
            # Busy CPU of everything else on the host over the same interval (other
            # workloads, or the server's other clients when --database-url is remote).
            "other_s": round(max(host - ours, 0.0), 2) if postgres is not None else None,
            "consumers_peak_rss_mb": end.consumers_peak_rss_mb,
        }
        if messages and postgres is not None and ours > 0:
            # Messages per CPU-second of this workload (client + server): comparable
            # between runs on a busy host, where msgs/s is not.
            out["msgs_per_cpu_s"] = round(messages / ours)
        return out


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
