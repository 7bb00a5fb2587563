"""Transport selection: same node -> shm (CPU pools) or cuda_ipc (GPU pools);
different nodes -> mooncake.  Configuration can force a transport."""

from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import urlsplit

from ..config import Config
from ..errors import ConfigError
from .base import Transport

LOCAL = ("shm", "cuda_ipc")


def choose_transport(encoder_pref: str, language_pref: str, same_node: bool, language_device: str) -> str:
    forced = {p for p in (encoder_pref, language_pref) if p and p != "auto"}
    if len(forced) > 1:
        raise ConfigError(f"encoder forces transport {encoder_pref!r}, language forces {language_pref!r}")
    if forced:
        choice = forced.pop()
        if choice in LOCAL and not same_node:
            raise ConfigError(f"transport {choice!r} needs both endpoints on one node")
        return choice
    if same_node:
        return "cuda_ipc" if language_device.startswith("cuda") else "shm"
    return "mooncake"


def endpoint_host(endpoint: str) -> str:
    """The host part of a ZeroMQ ``tcp://host:port`` endpoint."""
    if "://" not in endpoint:
        return "127.0.0.1"
    host = urlsplit(endpoint).hostname or "127.0.0.1"
    return host


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


def make_transport(name: str, config: Config, peer_host: Optional[str] = None) -> Transport:
    """``peer_host``: where the peer is (for the address Mooncake advertises)."""
    if name == "shm":
        from ..ipc.transport import ShmTransport
        return ShmTransport()
    if name == "cuda_ipc":
        from ..ipc.cuda_ipc import CudaIpcTransport
        dev = config.device if config.device.startswith("cuda") else None
        return CudaIpcTransport(device=dev, allow_same_process=True)
    if name == "mooncake":
        from .mooncake import MooncakeTransport
        host = config.mooncake_host or local_ip_towards(peer_host or "127.0.0.1")
        return MooncakeTransport.from_config(config, local_host=host,
                                             write_timeout=config.extra.get("mooncake_write_timeout"))
    raise ConfigError(f"unknown transport {name!r}")
