"""Packets dropped by the kernel, for a black hole no user-space proxy can fake.

A proxy that drops a stream still has a kernel that acknowledges every byte and answers
every keepalive probe, so a peer's keepalives and `tcp_user_timeout` never fire through
it. Here a `tc` filter on the loopback device's ingress redirects every packet to or from a
port to a veth device whose peer is down, which drops it: no ACK, no keepalive answer, no
RST, and a SYN goes unanswered too. The drop is on the way in, after the sender's kernel
has sent the packet: dropped on the way out (a queue on the device's egress), the sender's
TCP sees a local failure and gives up in seconds ("Connection timed out") whatever its
timeouts, as no lost packet on a real network makes it.

Rules on the loopback device would disturb every other process on the machine, so this
runs only in a private network namespace of the run's own (`reexec_in_private_netns`
starts the run again under `unshare -n`; everything the run starts, the server included,
lives there). The namespace, and every rule in it, is gone with the run's last process,
whatever way it ends. Needs root (CAP_NET_ADMIN in the namespace), `unshare`, `ip` and `tc`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence

# Set in the run started again in its own network namespace: the namespace it left.
NETNS_ENV = "PGCG_CHAOS_PRIVATE_NETNS"
_DEV = "lo"
_HOLE = "pgcg-hole"  # a veth device whose peer is down: what is sent there is dropped
_TCP_STATES_OPEN = {"01", "02", "03", "04", "05", "06", "08", "09", "0B"}  # not TIME_WAIT/CLOSE


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)


def unavailable() -> str | None:
    """Why packets cannot be dropped in a private namespace here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN in a private network namespace)"
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (iproute2, util-linux)"
    if in_private_netns():
        return None
    if os.environ.get(NETNS_ENV):  # started again already, and still in the machine's
        return "unshare -n left this process in the namespace it started in"
    probe = _run("unshare", "-n", "tc", "qdisc", "add", "dev", _DEV, "ingress")
    if probe.returncode != 0:
        return f"cannot shape a private namespace's loopback: {probe.stderr.strip()}"
    return None


def _netns() -> str:
    return str(os.stat("/proc/self/ns/net").st_ino)


def in_private_netns() -> bool:
    """Whether this process runs in the namespace its run made for itself, not the one
    the run was started in (another process's namespace may not be readable, so the
    starting one's is handed down)."""
    left = os.environ.get(NETNS_ENV)
    try:
        return bool(left) and _netns() != left
    except OSError:
        return False


def reexec_in_private_netns() -> None:
    """Start this very command again in a new network namespace (never returns)."""
    env = {**os.environ, NETNS_ENV: _netns()}
    argv = ["unshare", "-n", "--", *sys.orig_argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("unshare", argv, env)


class KernelHoles:
    """Drop rules on this namespace's loopback device. Rules are numbered by their filter
    priority, so each is deleted on its own."""

    def __init__(self) -> None:
        if not in_private_netns():
            raise RuntimeError("kernel black holes are only made in the run's own namespace")
        self._lock = threading.Lock()
        self._next = 10
        self._flows: dict[tuple[int, int], list[int]] = {}  # (client port, port): rules
        self._check("ip", "link", "set", _DEV, "up")
        self._check("ip", "link", "add", _HOLE, "type", "veth", "peer", "name", _HOLE + "-peer")
        self._check("ip", "link", "set", _HOLE, "up")
        self._check("tc", "qdisc", "add", "dev", _DEV, "ingress")

    @staticmethod
    def _check(*args: str) -> None:
        done = _run(*args)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")

    def _drop(self, *match: str) -> int:
        with self._lock:
            prio = self._next
            self._next += 1
        # On loopback every packet comes in through the device once: a filter there sees
        # both directions.
        self._check("tc", "filter", "add", "dev", _DEV, "parent", "ffff:", "protocol", "ip",
                    "prio", str(prio), "u32", *match, "action", "mirred", "egress",
                    "redirect", "dev", _HOLE)  # fmt: skip
        return prio

    def lift(self, rules: Sequence[int]) -> None:
        for prio in rules:
            _run("tc", "filter", "del", "dev", _DEV, "parent", "ffff:", "protocol", "ip",
                 "prio", str(prio))  # fmt: skip

    def drop_port(self, port: int) -> list[int]:
        """Drop every packet to or from `port`: its connections and new ones go silent."""
        return [
            self._drop("match", "ip", "dport", str(port), "0xffff"),
            self._drop("match", "ip", "sport", str(port), "0xffff"),
        ]

    def drop_flow(self, client_port: int, port: int) -> None:
        """Drop the packets of one connection (from `client_port` to `port`) for good."""
        rules = [
            self._drop("match", "ip", "sport", str(client_port), "0xffff",
                       "match", "ip", "dport", str(port), "0xffff"),
            self._drop("match", "ip", "sport", str(port), "0xffff",
                       "match", "ip", "dport", str(client_port), "0xffff"),
        ]  # fmt: skip
        self._flows[(client_port, port)] = rules

    def reap(self, everything: bool = False) -> int:
        """Lift the rules of dead flows whose client socket is gone (its port may be used
        again); `everything`: of every flow. How many flows are still dropped."""
        alive = set() if everything else _client_ports()
        for flow, rules in list(self._flows.items()):
            if flow not in alive:
                self.lift(rules)
                del self._flows[flow]
        return len(self._flows)


def _client_ports() -> set[tuple[int, int]]:
    """(local port, remote port) of every open IPv4 TCP socket in this namespace."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] not in _TCP_STATES_OPEN:
                continue
            local, remote = fields[1], fields[2]
            found.add((int(local.split(":")[1], 16), int(remote.split(":")[1], 16)))
    return found


def clients_of(port: int) -> list[int]:
    """The client ports of every open connection to `port` in this namespace."""
    return sorted(local for local, remote in _client_ports() if remote == port and local != port)
