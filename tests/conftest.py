import glob
import os
import time

import pytest

from embresume.config import Config
from embresume.harness import free_port


def _ours():
    return set(glob.glob("/dev/shm/embr-*")) | set(glob.glob("/dev/shm/sem.embr-*"))


@pytest.fixture(autouse=True)
def no_shm_leak():
    """Every test must leave /dev/shm as it found it."""
    before = _ours()
    yield
    deadline = time.monotonic() + 3
    while True:
        leaked = _ours() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"shared-memory objects left behind: {sorted(leaked)}"


def _mooncake_skip_reason():
    try:
        import embresume.transport.mooncake  # noqa: F401
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"Mooncake transport unavailable: {type(e).__name__}: {e}"
    return None


def gpu_skip_reason():
    """Why GPU tests cannot run here (None when they can)."""
    import torch
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and CuPy (torch sees no CUDA device)"
    try:
        import cupy  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"needs a CUDA GPU and CuPy (cupy does not import: {type(e).__name__}: {e})"
    return None


TRANSPORTS = [
    "shm",
    pytest.param("mooncake", marks=pytest.mark.mooncake),
    pytest.param("cuda_ipc", marks=pytest.mark.gpu),
]


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    reason = {"mooncake": _mooncake_skip_reason, "cuda_ipc": gpu_skip_reason}.get(request.param, lambda: None)()
    if reason:
        pytest.skip(reason)
    return request.param


def device_of(transport: str) -> str:
    return "cuda" if transport == "cuda_ipc" else "cpu"


def make_config(transport="shm", **kw) -> Config:
    base = dict(hidden_size=256, dtype="bf16", block_size=128, default_allocate_tokens=1024, pool_blocks=64,
                encoder_endpoint=f"tcp://127.0.0.1:{free_port()}", transport=transport, prefault=False,
                heartbeat_interval=0.2, peer_timeout=2.0, request_timeout=30.0, handshake_timeout=30.0)
    base["device"] = device_of(transport)
    base.update(kw)
    return Config(**base)
