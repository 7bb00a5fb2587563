"""Configuration of the endpoints.

Every field can be given explicitly; fields left at ``None`` are read from the
environment (``EMBRESUME_*`` first, then the original system's ``SGLANG_*``
names) and finally fall back to the defaults below.  Explicit arguments always
beat environment variables; a malformed value raises :class:`ConfigError` at
start-up, never later on the data path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from .errors import ConfigError

log = logging.getLogger("embresume.config")

#: env var -> fallback env var of the original system
ENV_NAMES = {
    "default_allocate_tokens": ("EMBRESUME_DEFAULT_ALLOCATE_TOKENS", "SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE"),
    "block_size": ("EMBRESUME_BLOCK_SIZE", "SGLANG_MULTIMODAL_BLOCK_SIZE"),
    "cache_buffers": ("EMBRESUME_CACHE_BUFFERS", "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE"),
    "ring_spin_us": ("EMBRESUME_RING_SPIN_US",),
}

DEFAULTS = {"default_allocate_tokens": 8192, "block_size": 128, "cache_buffers": 64, "ring_spin_us": 200}

#: env var of ``pool_bytes`` (a byte count: ``268435456``, ``512M``, ``2G``, ``1GiB``)
POOL_BYTES_ENV = "EMBRESUME_POOL_BYTES"

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
               "tib": 1 << 40}

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64,
}

TransportName = Literal["auto", "shm", "cuda_ipc", "mooncake"]


def parse_dtype(value) -> torch.dtype:
    """Accept a torch float dtype or its name ("bf16", "float16", ...)."""
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(f"embedding dtype must be a float dtype, got {value}")
        return value
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(f"unknown embedding dtype {value!r}; use one of {sorted(_DTYPES)}")


def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string with an optional binary suffix:
    ``"268435456"``, ``"512M"``, ``"512MiB"``, ``"2G"``, ``"1.5GiB"`` (K/M/G/T are powers of 1024)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a byte count, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        raw = value.strip().replace("_", "").replace(" ", "")
        i = len(raw)
        while i > 0 and raw[i - 1].isalpha():
            i -= 1
        num, unit = raw[:i], raw[i:].lower()
        if unit not in _SIZE_UNITS or not num:
            raise ConfigError(f"{what} {value!r} is not a byte count; use e.g. 268435456, 512M, 2G or 1GiB")
        try:
            f = float(num)
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not a byte count; use e.g. 268435456, 512M, 2G or 1GiB") \
                from None
        if not f == f or f in (float("inf"), float("-inf")):
            raise ConfigError(f"{what} {value!r} is not a byte count")
        n = int(f * _SIZE_UNITS[unit])
    else:
        raise ConfigError(f"{what} must be a byte count (int or a string like '512M'), got {value!r}")
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return n


def format_bytes(n: int) -> str:
    """``268435456`` -> ``"256.0 MiB"``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _env_int(name: str) -> Optional[int]:
    """The field's value from its environment variable, checked here so that the
    error names the variable (``EMBRESUME_BLOCK_SIZE=-4``)."""
    least = 0 if name == "ring_spin_us" else 1
    for env in ENV_NAMES[name]:
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"environment variable {env}={raw!r} is not an integer ({name})") from None
        if value < least:
            raise ConfigError(f"environment variable {env}={raw!r}: {name} must be "
                              f"{'a positive integer' if least else 'an integer >= 0'}")
        return value
    return None


def check_endpoint(value, what: str = "encoder_endpoint") -> str:
    """``tcp://HOST:PORT`` with a port in 1-65535 (HOST may be a name, an IPv4
    address, ``[IPv6]``, ``*`` or ``0.0.0.0``); ConfigError otherwise."""
    bad = f"{what} must be tcp://HOST:PORT with a port in 1-65535 (e.g. tcp://127.0.0.1:17600), got {value!r}"
    if not isinstance(value, str) or not value.startswith("tcp://"):
        raise ConfigError(bad)
    rest = value[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(bad)
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ConfigError(bad)
    elif host != "*" and (any(c in host for c in "/@?# []") or not host.strip(".:")):
        raise ConfigError(bad)
    return value


def as_config(config, who: str) -> "Config":
    """What an endpoint's constructor does with its ``config`` argument: None ->
    ``Config()``, a Config as it is; anything else (a dict of fields...) is a
    TypeError that says how to call it."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        raise TypeError(f"{who} takes a Config, not a dict: use {who}(Config(**fields)), e.g. "
                        f"{who}(Config(hidden_size=4096, dtype='bf16'))")
    raise TypeError(f"{who} takes an embresume.Config, got {type(config).__name__}")


@dataclass
class Config:
    """Settings shared by the encoder and the language endpoint.

    Pool geometry: the receive pool holds ``pool_blocks`` blocks of
    ``block_size`` tokens.  When ``pool_blocks`` is not given it is
    ``cache_buffers * ceil(default_allocate_tokens / block_size)``, i.e. room
    for ``cache_buffers`` default allocations (the original system's meaning).
    """

    hidden_size: int = 4096
    dtype: torch.dtype | str = torch.bfloat16
    block_size: Optional[int] = None
    default_allocate_tokens: Optional[int] = None
    cache_buffers: Optional[int] = None
    pool_blocks: Optional[int] = None
    #: size cap of the receive pool in bytes (int or "512M", "2G", "1GiB"; env
    #: ``EMBRESUME_POOL_BYTES``): the pool gets the most blocks that fit.
    #: Precedence: pool_blocks, then pool_bytes, then cache_buffers.
    pool_bytes: Optional[int | str] = None
    aux_ints: int = 16
    #: cap on the tokens one allocation (init or resume) asks for; None = no cap
    max_chunk_tokens: Optional[int] = None
    #: "cpu" or "cuda[:N]" — where the block pools live
    device: str = "cpu"
    #: "auto" picks shm/cuda_ipc on the same node and mooncake across nodes
    transport: TransportName = "auto"
    #: ZeroMQ endpoint of the encoder's handshake/control socket for peers on other
    #: hosts; peers on this host use the abstract Unix socket named after it
    #: (embresume.ipc.unix.socket_name)
    encoder_endpoint: str = "tcp://127.0.0.1:17600"
    #: seconds: handshake, waiting for the peer's inits/resumes, a chunk's status
    handshake_timeout: float = 10.0
    request_timeout: float = 60.0
    #: heartbeat period and the silence after which the peer is declared dead
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    #: pipelined chunks: the encoder writes a chunk in pieces of at most this many
    #: bytes of embeddings (and about four pieces of at least 2 MiB when the chunk
    #: is smaller than four of these) and reports PROGRESS after each, so the
    #: receiver copies out while the rest lands (0: off)
    pipeline_bytes: int = 8 << 20
    #: zero-copy receive: a request that arrives in one chunk in consecutive blocks
    #: is returned as views of the receive pool (no gather copy); its blocks stay
    #: allocated until ``EmbeddingResult.release()`` — which then becomes mandatory
    zero_copy: bool = False
    #: idle memory kept for recycling released results (EmbeddingResult.release)
    result_cache_bytes: int = 1 << 30
    #: touch every page of a new pool so the hot path never page-faults
    prefault: bool = True
    #: shm control ring capacity in bytes (per direction)
    ring_bytes: int = 1 << 20
    #: encoder side: microseconds a ring reader that just got a message keeps
    #: looking for the next before it sleeps on its doorbell (0: sleep at once).
    #: Saves the wake-up of a sleeping thread (an idle vCPU halts) when the next
    #: INIT or RESUME follows soon; costs at most this much CPU per message,
    #: never when idle.  The language side never spins.  Env: EMBRESUME_RING_SPIN_US
    ring_spin_us: Optional[int] = None
    #: Mooncake: "tcp" or "rdma"; device names for rdma ("" = auto)
    mooncake_protocol: str = "tcp"
    mooncake_devices: str = ""
    #: host name/IP the Mooncake engine advertises (None: derived from the endpoint)
    mooncake_host: Optional[str] = None
    #: encoder side: the transports it accepts from peers.  None (default): the
    #: same-host paths (shm, cuda_ipc) for peers on this node and mooncake for
    #: others, so a local peer cannot make it open Mooncake engines (ports on all
    #: interfaces); list "mooncake" to allow it for local peers too
    allowed_transports: Optional[tuple] = None
    #: shared secret of the TCP handshake (ZeroMQ CURVE keys derived from it, see
    #: embresume.auth); required to bind a non-loopback address.  Env: EMBRESUME_AUTH_KEY
    auth_key: Optional[str] = field(default=None, repr=False)
    #: same-host peers: uids besides our own whose processes may connect to the
    #: encoder's Unix socket (encoder side) or serve as an encoder (language
    #: side); checked with SO_PEERCRED.  Env: EMBRESUME_ALLOWED_UIDS="1001,1002"
    allowed_uids: Optional[tuple] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        if self.auth_key is None:
            self.auth_key = os.environ.get("EMBRESUME_AUTH_KEY") or None
        if self.allowed_uids is None and os.environ.get("EMBRESUME_ALLOWED_UIDS", "").strip():
            self.allowed_uids = os.environ["EMBRESUME_ALLOWED_UIDS"]
        for name in ("block_size", "default_allocate_tokens", "cache_buffers", "ring_spin_us"):
            if getattr(self, name) is None:
                value = _env_int(name)
                setattr(self, name, DEFAULTS[name] if value is None else value)
        d, b = self.default_allocate_tokens, self.block_size
        if (isinstance(d, int) and isinstance(b, int) and not isinstance(d, bool) and not isinstance(b, bool)
                and d > 0 and b > 0 and d % b):
            # the language side allocates whole blocks: that many tokens are what a request gets anyway
            rounded = -(-d // b) * b
            log.warning("default_allocate_tokens=%d is not a multiple of block_size=%d: rounded up to %d "
                        "(requests get whole blocks)", d, b, rounded)
            self.default_allocate_tokens = rounded
        if self.pool_bytes is None:
            raw = os.environ.get(POOL_BYTES_ENV, "").strip()
            if raw:
                try:
                    self.pool_bytes = parse_size(raw, POOL_BYTES_ENV)
                except ConfigError as e:
                    raise ConfigError(f"environment variable {POOL_BYTES_ENV}={raw!r}: {e}") from None
        elif not isinstance(self.pool_bytes, int) or isinstance(self.pool_bytes, bool):
            self.pool_bytes = parse_size(self.pool_bytes, "pool_bytes")
        self.validate()

    # ------------------------------------------------------------------
    def validate(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        for name in ("hidden_size", "block_size", "default_allocate_tokens", "cache_buffers", "aux_ints", "ring_bytes"):
            positive(name)
        if self.pool_blocks is not None:
            positive("pool_blocks")
        if self.pool_bytes is not None:
            positive("pool_bytes")
            if self.pool_blocks is None:
                self.total_pool_blocks  # noqa: B018  (raises ConfigError when not even one block fits)
        if self.max_chunk_tokens is not None:
            positive("max_chunk_tokens")
        v = self.ring_spin_us
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1_000_000:
            raise ConfigError(f"ring_spin_us must be an int in [0, 1000000] microseconds, got {v!r}")
        if self.aux_ints < 16:
            raise ConfigError(f"aux_ints must be >= 16, got {self.aux_ints}")
        if self.block_size > 1 << 20:
            raise ConfigError(f"block_size {self.block_size} is unreasonably large")
        if self.transport not in ("auto", "shm", "cuda_ipc", "mooncake"):
            raise ConfigError(f"transport must be auto, shm, cuda_ipc or mooncake, got {self.transport!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("handshake_timeout", "request_timeout", "heartbeat_interval", "peer_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.peer_timeout <= self.heartbeat_interval:
            raise ConfigError("peer_timeout must be longer than heartbeat_interval")
        if self.allowed_transports is not None:
            if isinstance(self.allowed_transports, str):
                self.allowed_transports = tuple(x.strip() for x in self.allowed_transports.split(",") if x.strip())
            self.allowed_transports = tuple(self.allowed_transports)
            bad = [x for x in self.allowed_transports if x not in ("shm", "cuda_ipc", "mooncake")]
            if bad or not self.allowed_transports:
                raise ConfigError(f"allowed_transports must name shm, cuda_ipc or mooncake, got "
                                  f"{self.allowed_transports!r}")
        if self.allowed_uids is not None:
            raw = self.allowed_uids
            items = raw.split(",") if isinstance(raw, str) else raw
            try:
                uids = tuple(int(x) for x in items if not isinstance(x, str) or x.strip())
                if any(isinstance(x, (bool, float)) for x in items):
                    uids = None
            except (TypeError, ValueError):
                uids = None
            if uids is None or any(isinstance(x, bool) or not 0 <= x < 1 << 32 for x in uids):
                raise ConfigError(f"allowed_uids must be uids (ints, or 'uid,uid' in EMBRESUME_ALLOWED_UIDS), "
                                  f"got {raw!r}")
            self.allowed_uids = uids
        check_endpoint(self.encoder_endpoint)
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise ConfigError(f"mooncake_protocol must be tcp or rdma, got {self.mooncake_protocol!r}")

    @property
    def peer_uids(self) -> frozenset:
        """The uids a same-host peer may run as: ours and ``allowed_uids``."""
        return frozenset((os.getuid(),) + tuple(self.allowed_uids or ()))

    @property
    def blocks_per_default_allocation(self) -> int:
        return -(-self.default_allocate_tokens // self.block_size)

    @property
    def total_pool_blocks(self) -> int:
        """Blocks of the receive pool: ``pool_blocks``, else the most that fit in
        ``pool_bytes``, else ``cache_buffers`` default allocations."""
        if self.pool_blocks is not None:
            return self.pool_blocks
        if self.pool_bytes is not None:
            return blocks_for_bytes(self.pool_bytes, self.block_size, self.hidden_size, self.dtype, self.aux_ints)
        return self.cache_buffers * self.blocks_per_default_allocation

    @property
    def pool_nbytes(self) -> int:
        """Bytes of one receive pool (one shm segment / GPU allocation per language rank)."""
        from .blocks import BlockLayout
        return BlockLayout(self.total_pool_blocks, self.block_size, self.hidden_size, self.dtype,
                           self.aux_ints).nbytes

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def blocks_for_bytes(nbytes: int, block_size: int, hidden: int, dtype: torch.dtype, aux_ints: int = 16) -> int:
    """The largest block count whose pool (:class:`~embresume.blocks.BlockLayout`) fits in ``nbytes``."""
    from .blocks import BlockLayout
    dtype = parse_dtype(dtype)

    def size(n: int) -> int:
        return BlockLayout(n, block_size, hidden, dtype, aux_ints).nbytes

    per_block = block_size * hidden * dtype.itemsize + block_size * 4 + 3 * block_size * 4 + aux_ints * 4
    if nbytes < size(1):
        raise ConfigError(f"pool_bytes={nbytes} ({format_bytes(nbytes)}) is smaller than one block of "
                          f"{block_size} tokens x hidden {hidden} ({format_bytes(size(1))} with its metadata)")
    lo, hi = 1, max(1, nbytes // per_block)   # size(lo) <= nbytes; the answer is <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= nbytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
