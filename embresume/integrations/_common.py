"""Helpers shared by the engine adapters (no engine imports here)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from ..config import ENV_NAMES, POOL_BYTES_ENV, Config
from ..errors import ConfigError

log = logging.getLogger("embresume.integrations")

#: the Config fields an adapter passes through from its options (others are the adapter's own)
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


#: receive-pool size an adapter uses when nothing sizes the pool (the library's own
#: default, 64 allocations of 8192 tokens, is 4 GiB at hidden 4096 bf16)
DEFAULT_POOL_BYTES = "1GiB"


def build_config(options: Mapping[str, Any], *, hidden_size: Optional[int] = None, dtype=None,
                 device: Optional[str] = None, encoder_endpoint: Optional[str] = None,
                 own_keys: Iterable[str] = (), what: str = "options",
                 default_pool_bytes=DEFAULT_POOL_BYTES) -> Config:
    """A :class:`~embresume.config.Config` from an engine's option dict.

    Every key of ``options`` that names a ``Config`` field is passed through
    (``pool_blocks``, ``pool_bytes``, ``transport``, ``block_size``,
    ``request_timeout``, ``auth_key`` when this embresume has it, ...); the
    keyword arguments fill what the engine knows (the model's width and dtype,
    the worker's device) unless ``options`` sets them.  A pool nothing sizes
    (no pool option, no ``EMBRESUME_POOL_BYTES`` / ``EMBRESUME_CACHE_BUFFERS``)
    gets ``default_pool_bytes``.  Keys that are neither a
    ``Config`` field nor in ``own_keys`` raise :class:`ConfigError`, so a typo
    fails at start-up instead of being ignored."""
    own = set(own_keys)
    unknown = sorted(k for k in options if k not in CONFIG_FIELDS and k not in own)
    if unknown:
        raise ConfigError(f"unknown embresume {what} key(s) {unknown}; valid: "
                          f"{sorted(CONFIG_FIELDS | own)}")
    kw = {k: v for k, v in options.items() if k in CONFIG_FIELDS}
    for key, value in (("hidden_size", hidden_size), ("dtype", dtype), ("device", device),
                       ("encoder_endpoint", encoder_endpoint)):
        if key not in kw and value is not None:
            kw[key] = value
    if "hidden_size" not in kw:
        raise ConfigError(f"embresume needs the embedding width: set 'hidden_size' in the {what}")
    if isinstance(kw.get("hidden_size"), str):
        kw["hidden_size"] = int(kw["hidden_size"])
    sized = any(k in kw for k in ("pool_blocks", "pool_bytes", "cache_buffers"))
    sized_by_env = any(os.environ.get(e, "").strip() for e in (POOL_BYTES_ENV, *ENV_NAMES["cache_buffers"]))
    if default_pool_bytes is not None and not sized and not sized_by_env:
        kw["pool_bytes"] = default_pool_bytes
    return Config(**kw)


def pick_encoder(key: str, addresses: Sequence[str]) -> str:
    """The encoder that serves ``key`` among ``addresses``: a stable hash, the
    same in every process and run, so a proxy that routes a multimodal item
    to ``pick_encoder(mm_hash, encoders)`` and the language side agree without
    telling each other."""
    if not addresses:
        raise ConfigError("no encoder addresses")
    if len(addresses) == 1:
        return addresses[0]
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return addresses[h % len(addresses)]


def as_address_list(value) -> list[str]:
    """``"tcp://a:1"``, ``"tcp://a:1,tcp://b:2"`` or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out.extend(as_address_list(v))
        return out
    raise ConfigError(f"encoder addresses must be a string or a list of strings, got {value!r}")


class ZeroSides:
    """The fill_ids ``[T]`` and mrope positions ``[3, T]`` (int32 zeros) that
    go with an embedding when the engine has none (vLLM's encoder cache holds
    only ``[num_embeds, width]``): views of one zero buffer per device, grown
    by doubling, never written, so concurrent rooms can share them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict = {}

    def get(self, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        with self._lock:
            buf = self._bufs.get(device)
            if buf is None or buf.shape[1] < tokens:
                n = max(tokens, 2 * (0 if buf is None else buf.shape[1]), 1024)
                buf = self._bufs[device] = torch.zeros(4, n, dtype=torch.int32, device=device)
        return buf[0, :tokens], buf[1:4, :tokens]


def advertised_address(address: str) -> str:
    """``address`` as peers should dial it: a wildcard host (0.0.0.0, ``*``)
    becomes this host's IP."""
    import socket
    from urllib.parse import urlsplit
    u = urlsplit(address)
    if u.hostname in ("0.0.0.0", "*", "::", None):
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = "127.0.0.1"
        return f"tcp://{ip}:{u.port}"
    return address


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_WIDE_CPUS: Optional[frozenset] = None


def process_cpus() -> Optional[frozenset]:
    """Every core this process may run on (its cgroup's cpuset), found once: the kernel
    intersects a requested affinity with what the cgroup allows."""
    global _WIDE_CPUS
    if _WIDE_CPUS is None and hasattr(os, "sched_setaffinity"):
        try:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            try:
                _WIDE_CPUS = frozenset(os.sched_getaffinity(0))
            finally:
                os.sched_setaffinity(0, before)
        except OSError:
            return None
    return _WIDE_CPUS


class unpinned:
    """``with unpinned():`` threads started inside run on every core the process may use.

    An engine may pin the thread that calls the connector to a few cores (vLLM's CPU build
    binds each worker's OpenMP threads, the calling thread included, and a thread inherits
    its creator's affinity): embresume's own threads started from it would then share
    those cores with the engine's spinning workers (and, with two instances bound to the
    same cores, starve: handshakes time out).  The calling thread's own affinity is put
    back on exit.  Linux only; elsewhere, or when not pinned, nothing happens."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._before = None

    def __enter__(self) -> "unpinned":
        if not self._enabled or not hasattr(os, "sched_getaffinity"):
            return self
        wide = process_cpus()
        try:
            before = os.sched_getaffinity(0)
            if wide and before != wide:
                os.sched_setaffinity(0, wide)
                self._before = before
        except OSError:
            log.debug("could not widen this thread's CPU affinity", exc_info=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            try:
                os.sched_setaffinity(0, self._before)
            except OSError:
                log.debug("could not restore this thread's CPU affinity", exc_info=True)
            self._before = None
