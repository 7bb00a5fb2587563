"""Configuration of the endpoints.

Every field can be given explicitly; fields left at ``None`` are read from the
environment (``EMBRESUME_*`` first, then the original system's ``SGLANG_*``
names) and finally fall back to the defaults below.  Explicit arguments always
beat environment variables; a malformed value raises :class:`ConfigError` at
start-up, never later on the data path.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from .errors import ConfigError

#: env var -> fallback env var of the original system
ENV_NAMES = {
    "default_allocate_tokens": ("EMBRESUME_DEFAULT_ALLOCATE_TOKENS", "SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE"),
    "block_size": ("EMBRESUME_BLOCK_SIZE", "SGLANG_MULTIMODAL_BLOCK_SIZE"),
    "cache_buffers": ("EMBRESUME_CACHE_BUFFERS", "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE"),
}

DEFAULTS = {"default_allocate_tokens": 8192, "block_size": 128, "cache_buffers": 64}

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


def _env_int(name: str) -> Optional[int]:
    for env in ENV_NAMES[name]:
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            continue
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"environment variable {env}={raw!r} is not an integer") from None
    return None


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
    aux_ints: int = 16
    #: cap on the tokens one allocation (init or resume) asks for; None = no cap
    max_chunk_tokens: Optional[int] = None
    #: "cpu" or "cuda[:N]" — where the block pools live
    device: str = "cpu"
    #: "auto" picks shm/cuda_ipc on the same node and mooncake across nodes
    transport: TransportName = "auto"
    #: ZeroMQ endpoint of the encoder's handshake/control socket
    encoder_endpoint: str = "tcp://127.0.0.1:17600"
    #: seconds: handshake, waiting for the peer's inits/resumes, a chunk's status
    handshake_timeout: float = 10.0
    request_timeout: float = 60.0
    #: heartbeat period and the silence after which the peer is declared dead
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    #: pipelined chunks: the encoder reports PROGRESS every this many bytes of
    #: embeddings written so the receiver copies out while the rest lands (0: off)
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
    #: Mooncake: "tcp" or "rdma"; device names for rdma ("" = auto)
    mooncake_protocol: str = "tcp"
    mooncake_devices: str = ""
    #: host name/IP the Mooncake engine advertises (None: derived from the endpoint)
    mooncake_host: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        for name in ("block_size", "default_allocate_tokens", "cache_buffers"):
            if getattr(self, name) is None:
                value = _env_int(name)
                setattr(self, name, DEFAULTS[name] if value is None else value)
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
        if self.max_chunk_tokens is not None:
            positive("max_chunk_tokens")
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
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise ConfigError(f"mooncake_protocol must be tcp or rdma, got {self.mooncake_protocol!r}")

    @property
    def blocks_per_default_allocation(self) -> int:
        return -(-self.default_allocate_tokens // self.block_size)

    @property
    def total_pool_blocks(self) -> int:
        if self.pool_blocks is not None:
            return self.pool_blocks
        return self.cache_buffers * self.blocks_per_default_allocation

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)
