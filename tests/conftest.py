import glob
import os
import time

import pytest

from embresume.config import Config
from embresume.harness import free_port


def _creator(path):
    """The pid in /dev/shm/[sem.]embr-<pid>[.<ns>]-...; None if unreadable."""
    base = os.path.basename(path).removeprefix("sem.").removeprefix("embr-")
    pid = base.split("-", 1)[0].split(".", 1)[0]
    return int(pid) if pid.isdigit() else None


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None          # gone


def _ours():
    """Our shared-memory names: created by this process, one of its children, or
    a process that is gone (a leak); not those of unrelated live processes (another
    test run on the same machine)."""
    me = os.getpid()
    out = set()
    for path in glob.glob("/dev/shm/embr-*") + glob.glob("/dev/shm/sem.embr-*"):
        pid = _creator(path)
        if pid is None or pid == me or _ppid(pid) in (None, me):
            out.add(path)
    return out


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
