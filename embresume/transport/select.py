"""Transport selection: same node -> shm (CPU pools) or cuda_ipc (GPU pools);
different nodes -> mooncake.  Configuration can force a transport."""

from __future__ import annotations

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


def make_transport(name: str, config: Config) -> Transport:
    if name == "shm":
        from ..ipc.transport import ShmTransport
        return ShmTransport()
    if name == "cuda_ipc":
        from ..ipc.cuda_ipc import CudaIpcTransport
        return CudaIpcTransport()
    if name == "mooncake":
        from .mooncake import MooncakeTransport
        return MooncakeTransport.from_config(config)
    raise ConfigError(f"unknown transport {name!r}")
