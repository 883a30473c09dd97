"""A throwaway PgBouncer in transaction pooling in front of a PostgreSQL server, for tests
and benchmarks of pgcg behind a pooler.

Every database name is forwarded to the server (`* =`), so per-test databases work. The
pool is small on purpose: with fewer server connections than clients, consecutive
transactions of one client land on different server connections, which is what exposes
anything that wrongly relies on a session (one client alone always gets the same one).

PgBouncer refuses to run as root: as root it runs as `postgres` (the Debian package's user,
which also owns the system's PostgreSQL). It runs in the foreground as our child, and a
watchdog stops it if we die without cleaning up, as for the throwaway server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pgcg.bench.throwaway import _free_port

_WATCHDOG = r"""
import os, signal, sys, time
owner, child = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    try:
        os.kill(owner, 0)
        os.kill(child, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
try:
    os.kill(child, signal.SIGTERM)
except ProcessLookupError:
    pass
"""


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable (Debian puts it in /usr/sbin, not always on PATH)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


class ThrowawayPgBouncer:
    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        pool_size: int = 2,
        user: str = "postgres",
        system_user: str = "postgres",
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.pool_size = pool_size
        self.user = user
        self.system_user = system_user
        self.port = _free_port()
        self.base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        assert self.base is not None
        path = self.base / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
        self.base = Path(tempfile.mkdtemp(prefix="pgcg-pgbouncer-"))
        (self.base / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.base / "pgbouncer.ini").write_text(
            "\n".join([
                "[databases]",
                f"* = host={self.server_host} port={self.server_port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "auth_type = trust",
                f"admin_users = {self.user}",
                f"auth_file = {self.base}/users.txt",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 500",
                f"unix_socket_dir = {self.base}",
                f"logfile = {self.base}/pgbouncer.log",
                # psycopg sends these at startup; PgBouncer would refuse the connection.
                "ignore_startup_parameters = extra_float_digits,options",
                "",
            ])
        )  # fmt: skip
        cmd = [binary, str(self.base / "pgbouncer.ini")]
        if os.geteuid() == 0:
            for path in [self.base, *self.base.iterdir()]:
                shutil.chown(path, self.system_user)
            cmd = ["runuser", "-u", self.system_user, "--", *cmd]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self._proc.pid)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self._proc.returncode}:\n{self.log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen within {timeout}s:\n{self.log}")
            time.sleep(0.05)

    def server_pids(self) -> set[int]:
        """Backend pids of PgBouncer's server connections (SHOW SERVERS on its console)."""
        import psycopg

        with psycopg.connect(self.url_for("pgbouncer"), autocommit=True) as conn:
            # The console speaks the simple query protocol only.
            result = conn.pgconn.exec_(b"SHOW SERVERS")
            names = [result.fname(n) for n in range(result.nfields)]
            column = names.index(b"remote_pid")
            return {int(result.get_value(row, column) or 0) for row in range(result.ntuples)}

    def cleanup(self) -> None:
        if self._proc is not None:
            # runuser passes SIGTERM on: PgBouncer shuts down at once.
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> ThrowawayPgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
