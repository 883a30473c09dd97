"""Real pgcg processes on this machine, for the demo, the chaos runner and the tests.

Each process is `python -m pgcg.shared.cli ...` with its own JSON log file, so a run can
SIGKILL, SIGSTOP/SIGCONT or SIGTERM any of them and read afterwards what each one did.
Every session a process opens carries its name as the `pgcg.proc` setting (PGOPTIONS), so
the journal's triggers can tell which process deleted a row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg


@dataclass(eq=False)
class Proc:
    name: str
    kind: str  # consumer | coordinator
    popen: subprocess.Popen[bytes]
    log_path: Path
    paused: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        self.popen.wait(10)

    def pause(self) -> None:
        self.send(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.send(signal.SIGCONT)
        self.paused = False

    def terminate(self) -> None:
        if self.paused:
            self.resume()
        self.send(signal.SIGTERM)

    def logs(self) -> list[dict[str, Any]]:
        """The process's JSON log records (non-JSON lines, e.g. tracebacks, are kept as msg)."""
        records = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"msg": line, "action": None}
            if isinstance(record, dict):
                records.append(record)
        return records

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("action") == action]


class Cluster:
    """Starts and tracks pgcg processes against one database."""

    def __init__(self, dsn: str, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PGCG_DATABASE_URL": dsn,
            "PGCG_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.procs: list[Proc] = []
        self._counter = 0

    def _spawn(
        self,
        kind: str,
        args: list[str],
        name: str | None,
        env: dict[str, str] | None,
        module: str | None = None,
    ) -> Proc:
        self._counter += 1
        name = name or f"{kind}-{self._counter}"
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        options = f"{self.env.get('PGOPTIONS', '')} -c pgcg.proc={name}".strip()
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *args]
            if module
            else [sys.executable, "-m", "pgcg.shared.cli", kind, *args],
            env={**self.env, "PGOPTIONS": options, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        proc = Proc(name, kind, popen, log_path)
        self.procs.append(proc)
        return proc

    def coordinator(
        self,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        module: str | None = None,
    ) -> Proc:
        """A coordinator process: `pgcg coordinator`, or `python -m module` (a variant of
        it a test run builds)."""
        return self._spawn("coordinator", list(args), name, env, module)

    def consumer(
        self,
        group: str,
        topic: str,
        handler: str,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """A consumer process; `env` overrides the cluster's (e.g. PGCG_DATABASE_URL of a
        proxy in front of the database)."""
        return self._spawn(
            "consumer",
            ["--group", group, "--topic", topic, "--handler", handler, *args],
            name,
            env,
        )

    def live(self, kind: str | None = None) -> list[Proc]:
        return [p for p in self.procs if p.alive and (kind is None or p.kind == kind)]

    def by_pid(self, pid: int) -> Proc | None:
        return next((p for p in self.procs if p.pid == pid), None)

    def member_id(self, proc: Proc) -> str | None:
        """The member id a consumer process currently holds (None if not joined)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT member_id FROM pgcg.consumer_groups WHERE pid = %s "
                "ORDER BY joined_at DESC LIMIT 1",
                (proc.pid,),
            ).fetchone()
        return row[0] if row else None

    def leader(self, group: str) -> tuple[Proc | None, int]:
        """The coordinator process leading `group` (by its pid in leader_id) and the epoch."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT leader_id, leader_epoch FROM pgcg.coordinator_leader WHERE scope = %s",
                (group,),
            ).fetchone()
        if not row or not row[0]:
            return None, 0
        pid = int(str(row[0]).rsplit("-", 2)[-2])
        return self.by_pid(pid), int(row[1])

    def stop_all(self, timeout: float = 20.0) -> None:
        for proc in self.procs:
            if proc.alive:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
