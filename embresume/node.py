"""Node identity and process liveness.

``node_id`` (hostname, boot id, network and IPC namespaces) is carried in the
handshake for the logs; whether a peer is on this host is decided by how it
connected (the encoder's Unix socket: :mod:`embresume.ipc.unix`), never by
what it claims.  ``pid_alive`` counts a zombie as dead.
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
