"""Node identity: decides whether two endpoints share a host.

Two processes are "on the same node" when hostname, boot id and their network
and IPC namespaces agree.  Processes in different network namespaces (or
containers) are treated as different nodes even on one machine, so a test
with two network namespaces exercises the cross-host path for real.
"""

from __future__ import annotations

import functools
import os
import socket


def _ns(kind: str) -> str:
    try:
        return str(os.stat(f"/proc/self/ns/{kind}").st_ino)
    except OSError:
        return "?"


@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "no-boot-id"


def node_id() -> str:
    return f"{socket.gethostname()}/{_boot_id()}/net:{_ns('net')}/ipc:{_ns('ipc')}"


def pidns() -> str:
    return _ns("pid")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # "pid (comm) S ...": the state follows the last ')' (comm may contain ')')
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return True
