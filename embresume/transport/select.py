"""Transport registry and selection.

The endpoints never name a transport; they call these functions, which ask
the transport classes for their capabilities:

* :func:`create_pool_backing` (language side, once): the memory of the one
  receive pool, made by the most specific transport the configuration allows
  for the pool's device (CPU -> POSIX shm, GPU -> one cudaMalloc), so that
  every other allowed transport can export it too (Mooncake registers it);
* :func:`offer` (language side, per connection): the transports that can
  export that pool, in preference order, sent in the hello;
* :func:`choose` (encoder side): the first offered transport this side allows
  and can run, skipping same-host-only ones for peers on another node;
* :class:`TransportSet`: instances shared by the connections of one endpoint
  (:meth:`Transport.instance_key`).
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
from typing import Iterable, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError, TransportUnavailable
from .base import Transport

log = logging.getLogger("embresume.transport")

#: preference order: the most specific (fastest, same-host) first
REGISTRY: dict[str, str] = {
    "cuda_ipc": "embresume.transport.cuda_ipc:CudaIpcTransport",
    "shm": "embresume.transport.shm:ShmTransport",
    "mooncake": "embresume.transport.mooncake:MooncakeTransport",
}
NAMES = tuple(REGISTRY)


def transport_class(name: str) -> type[Transport]:
    try:
        mod, _, cls = REGISTRY[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown transport {name!r}; known: {', '.join(NAMES)}") from None
    return getattr(importlib.import_module(mod), cls)


def allowed(config) -> list[str]:
    """Transports this side's configuration allows, in preference order."""
    return list(NAMES) if config.transport == "auto" else [config.transport]


def unavailable_reason(name: str) -> Optional[str]:
    try:
        cls = transport_class(name)
    except Exception as e:  # an import failure is a reason, not a crash
        return f"{type(e).__name__}: {e}"
    return cls.unavailable_reason()


def create_pool_backing(config, nbytes: int):
    """Memory for the language endpoint's receive pool.

    Returns ``(backing, device)``: for a GPU model whose GPU cannot be
    exported by any allowed transport the pool stays on the host (results
    are moved to the model's device after the merge)."""
    dev_type = "cuda" if config.device.startswith("cuda") else "cpu"
    tried = []
    for device in ([config.device, "cpu"] if dev_type == "cuda" else ["cpu"]):
        dtype = "cuda" if device.startswith("cuda") else "cpu"
        for name in allowed(config):
            cls = transport_class(name)
            if dtype not in cls.pool_devices:
                continue
            reason = cls.unavailable_reason()
            if reason:
                tried.append(f"{name}: {reason}")
                continue
            try:
                backing = cls.create_backing(nbytes, device, config.prefault)
            except TransportUnavailable as e:
                tried.append(f"{name}: {e}")
                continue
            if device != config.device:
                log.warning("no transport can carry a receive pool on %s (%s); the pool stays in host "
                            "memory and results are moved to %s", config.device, "; ".join(tried),
                            config.device)
            return backing, device
    raise ConfigError(f"no allowed transport can carry a receive pool for device {config.device!r}: "
                      + ("; ".join(tried) or f"transport={config.transport!r}"))


def offer(config, transports: "TransportSet", pool, peer_host: Optional[str],
          exclude: Iterable[str] = ()) -> list[str]:
    """Language side: the transports that can export ``pool``, best first."""
    out = []
    for name in allowed(config):
        if name in exclude or unavailable_reason(name):
            continue
        if transports.get(name, peer_host).can_export(pool):
            out.append(name)
    return out


def accepted(config, name: str, same_node: bool) -> bool:
    """Encoder side: may a peer use ``name``?  ``Config.allowed_transports``, by
    default the same-host transports for peers on this host (their handshake
    came over the Unix socket) and the others for peers elsewhere (a local
    peer cannot make us open Mooncake engines)."""
    if config.transport != "auto" and name != config.transport:
        return False
    if config.allowed_transports is not None:
        return name in config.allowed_transports
    if config.transport != "auto":
        return True
    return transport_class(name).same_host_only == same_node


def choose(config, offered: list, same_node: bool) -> str:
    """Encoder side: the first offered transport this side allows and can run."""
    reasons = []
    for name in offered:
        if name not in REGISTRY:
            continue
        cls = transport_class(name)
        if cls.same_host_only and not same_node:
            reasons.append(f"{name}: needs both endpoints on one node")
            continue
        if not accepted(config, name, same_node):
            reasons.append(f"{name}: not accepted here (transport={config.transport!r}, "
                           f"allowed_transports={config.allowed_transports!r})")
            continue
        reason = cls.unavailable_reason()
        if reason:
            reasons.append(f"{name}: {reason}")
            continue
        return name
    raise ConfigError("no common transport: the language side offers "
                      f"{', '.join(map(str, offered)) or 'none'}"
                      + (f" ({'; '.join(reasons)})" if reasons else ""))


class TransportSet:
    """The transport instances of one endpoint, shared by its connections."""

    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self._items: dict = {}

    def get(self, name: str, peer_host: Optional[str] = None) -> Transport:
        cls = transport_class(name)
        key = cls.instance_key(self.config, peer_host)
        with self._lock:
            t = self._items.get(key)
            if t is None:
                t = self._items[key] = cls.create(self.config, peer_host)
            return t

    def for_desc(self, name: str, desc: dict) -> Transport:
        """Encoder side: the instance that writes to the pool ``desc`` describes."""
        return self.get(name, transport_class(name).peer_host(desc))

    def instances(self) -> list[Transport]:
        with self._lock:
            return list(self._items.values())

    def close(self) -> None:
        for t in self.instances():
            try:
                t.close()
            except Exception:
                log.debug("transport close failed", exc_info=True)


def endpoint_host(endpoint: str) -> str:
    """The host part of a ZeroMQ ``tcp://host:port`` endpoint."""
    if "://" not in endpoint:
        return "127.0.0.1"
    return urlsplit(endpoint).hostname or "127.0.0.1"


def is_local(endpoint: str) -> bool:
    """Is the encoder at ``endpoint`` on this host, in our network namespace?
    (Then the handshake goes over its Unix socket.)  True for loopback and
    wildcard hosts, ``ipc://``/``inproc://``, and any address one of our
    interfaces has (it can be bound)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint_host(endpoint)
    if host in ("localhost", "*", "0.0.0.0", "::", "::1", "") or host.startswith("127."):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def local_ip_towards(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    if host in ("localhost", "*", "0.0.0.0", "::", "") or host.startswith("127."):
        return "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
