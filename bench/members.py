"""Real `pgcg consumer` processes for a bench run, and optional py-spy profilers on them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from pgcg.bench.handlers import REPORT_DIR_ENV
from pgcg.shared.queries import Queries

COORD = Queries("coordinator")


class BenchError(RuntimeError):
    pass


def assign_evenly(
    conn: psycopg.Connection[Any], group: str, topic: str, partitions: int, members: list[str]
) -> None:
    """Partitions round-robin over `members` at once, with the coordinator's statement."""
    with conn.transaction():
        conn.execute(COORD.assign, {
            "group": group, "topic": topic, "partitions": list(range(partitions)),
            "members": [members[p % len(members)] for p in range(partitions)],
        })  # fmt: skip
        conn.execute(COORD.notify_group, {"group": group})


def wait_assignments_seen(conn: Any, group: str, timeout: float = 60.0) -> None:
    """Until every member heartbeated after its partitions were assigned: the heartbeat's
    answer carries the assignments (at once with NOTIFY, within a heartbeat without)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        behind = conn.execute(
            "SELECT count(*) AS n FROM pgcg.partition_assignments AS pa "
            "JOIN pgcg.consumer_groups AS cg USING (group_name, member_id) "
            "WHERE pa.group_name = %s AND cg.last_heartbeat <= pa.assigned_at",
            (group,),
        ).fetchone()
        if behind["n"] == 0:
            return
        time.sleep(0.05)
    raise BenchError(f"the consumers of {group} did not see their assignments in {timeout}s")


class ConsumerProcesses:
    """P consumer processes of one group; stopped with SIGTERM (graceful), killed if stuck."""

    def __init__(
        self,
        dsn: str,
        *,
        group: str,
        topic: str,
        handler: str,
        count: int,
        workdir: Path,
        settings: dict[str, Any],
        env: dict[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.group = group
        self.topic = topic
        self.handler = handler
        self.count = count
        self.workdir = workdir
        self.settings = settings
        self.env = env or {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self._profilers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        inherited = os.environ
        if any(name.startswith("OTEL_") for name in self.env):
            # The run decides tracing alone: an OTEL_* left in the shell (another endpoint,
            # propagator or exporter) would quietly measure something else.
            inherited = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env = {
            **inherited,
            "PGCG_DATABASE_URL": self.dsn,
            "PGCG_LOG_FORMAT": "json",
            "PGCG_LOG_LEVEL": "WARNING",
            REPORT_DIR_ENV: str(self.workdir),
            **{f"PGCG_{k.upper()}": str(v) for k, v in self.settings.items()},
            **self.env,
        }
        cmd = [sys.executable, "-m", "pgcg.shared.cli", "consumer",
               "--group", self.group, "--topic", self.topic, "--handler", self.handler]  # fmt: skip
        for n in range(self.count):
            log = open(self.workdir / f"consumer-{n}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            )

    def _check_alive(self) -> None:
        for n, proc in enumerate(self.procs):
            if proc.poll() is not None:
                tail = (self.workdir / f"consumer-{n}.log").read_text(errors="replace")[-2000:]
                raise BenchError(f"consumer {n} exited with {proc.returncode}:\n{tail}")

    def wait_joined(self, conn: psycopg.Connection[Any], timeout: float = 60.0) -> list[str]:
        """Member ids of our processes once all of them joined, in process order."""
        pids = [p.pid for p in self.procs]
        deadline = time.monotonic() + timeout
        while True:
            rows = conn.execute(
                "SELECT member_id, pid FROM pgcg.consumer_groups "
                "WHERE group_name = %s AND pid = ANY(%s)",
                (self.group, pids),
            ).fetchall()
            by_pid = {r["pid"]: r["member_id"] for r in rows}
            if len(by_pid) == len(pids):
                return [by_pid[pid] for pid in pids]
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(by_pid)} of {len(pids)} consumers joined in time")
            time.sleep(0.05)

    def start_profilers(self, folder: Path, label: str | None = None, rate: int = 250) -> None:
        """py-spy on every consumer until stop_profilers(); collapsed stacks, one file each,
        named after `label` (default: the handler), so drains of one run keep their own."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            raise BenchError("--profile needs py-spy: pip install py-spy")
        folder.mkdir(parents=True, exist_ok=True)
        for n, proc in enumerate(self.procs):
            name = label or self.handler.rsplit(":", 1)[-1]
            out = folder / f"{name}-consumer-{n}.txt"
            self._profilers.append(
                subprocess.Popen(
                    [py_spy, "record", "--pid", str(proc.pid), "--rate", str(rate),
                     "--format", "raw", "--nonblocking", "--output", str(out)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip

    def stop_profilers(self) -> None:
        for prof in self._profilers:
            prof.send_signal(signal.SIGINT)
        for prof in self._profilers:
            try:
                prof.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait()
        self._profilers.clear()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_profilers()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def reports(self) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            path = self.workdir / f"{proc.pid}.json"
            with contextlib.suppress(FileNotFoundError):
                out.append(json.loads(path.read_text(encoding="utf-8")))
        return out

    def __enter__(self) -> ConsumerProcesses:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
