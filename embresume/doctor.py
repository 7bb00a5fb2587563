"""``embresume doctor``: which paths this machine can run, and why not."""

from __future__ import annotations

import os
import socket


def shm_budget(free: int) -> tuple[str, bool, str]:
    """Does the receive pool of the default Config (environment included) fit in
    the memory available for shared memory?"""
    from .config import Config, format_bytes
    from .errors import ConfigError
    try:
        c = Config()
    except ConfigError as e:
        return ("shm budget (default Config)", False, f"bad configuration: {e}")
    need = c.pool_nbytes
    how = (f"pool_blocks={c.pool_blocks}" if c.pool_blocks is not None else
           f"pool_bytes={c.pool_bytes}" if c.pool_bytes is not None else
           f"{c.cache_buffers} x {c.default_allocate_tokens} tokens")
    detail = (f"one receive pool per language rank: {format_bytes(need)} ({need} bytes; {c.total_pool_blocks} "
              f"blocks, {how}, hidden {c.hidden_size} {str(c.dtype).removeprefix('torch.')}) vs "
              f"{format_bytes(free)} free")
    if need <= free:
        return ("shm budget (default Config)", True, detail + f": fits {free // need} rank(s)")
    return ("shm budget (default Config)", False,
            detail + ": does NOT fit; set EMBRESUME_POOL_BYTES / Config(pool_bytes=...) or fewer cache_buffers, "
                     "or give the process more memory")


def mooncake_summary(d: dict) -> str:
    """What a user needs of Mooncake's diagnostics: the package, what it can
    drive, and the one security fact; not the transport's internal counters."""
    if not d.get("available"):
        return str(d.get("reason") or d.get("error") or "not installed (the rdma or rdma-cpu extra)")
    parts = [f"{d.get('package', 'mooncake')} {d.get('version', '')}".strip()]
    kinds = [name for key, name in (("support_cuda", "CUDA"), ("support_efa", "EFA"), ("support_hip", "HIP"),
                                    ("support_intra_nvlink", "NVLink"), ("support_mnnvl", "MNNVL")) if d.get(key)]
    parts.append("GPU memory: " + ", ".join(kinds) if kinds else "host memory only")
    parts.append("RDMA usable" if d.get("rdma_usable") else "tcp only (no RDMA device)")
    parts.append("its ports are unauthenticated: keep them on a private network")
    return "; ".join(parts)


def checks() -> list[tuple[str, bool, str]]:
    out = []
    import torch
    out.append(("torch", True, torch.__version__))
    out.append(("memfd + eventfd (shm path)", hasattr(os, "memfd_create") and hasattr(os, "eventfd"),
                "sealed anonymous segments, passed over a Unix socket"))
    out.append(("Unix sockets: SO_PEERCRED, fd passing", hasattr(socket, "SO_PEERCRED") and hasattr(socket, "send_fds"),
                "same-host handshake"))
    try:
        import zmq
        out.append(("pyzmq (cross-host handshake and control)", True, zmq.pyzmq_version()))
    except Exception as e:
        out.append(("pyzmq", False, str(e)))
    from .ipc.shm import memory_free_bytes
    free = memory_free_bytes()
    if free is not None:
        out.append(("memory for shared pools", True, f"{free[0] / 2**30:.1f} GiB available of {free[1] / 2**30:.1f} "
                    "GiB (MemAvailable, capped by the memory cgroup; /dev/shm's size does not matter)"))
        out.append(shm_budget(free[0]))
    else:
        out.append(("memory for shared pools", False, "unknown (/proc/meminfo unreadable)"))
    cuda = torch.cuda.is_available()
    out.append(("CUDA (GPU pools)", cuda, torch.cuda.get_device_name(0) if cuda else "no CUDA device"))
    try:
        import cupy
        out.append(("cupy (GPU kernels, CUDA IPC)", True, cupy.__version__))
    except Exception as e:
        out.append(("cupy (GPU kernels, CUDA IPC)", False, f"{type(e).__name__}: {e}"[:120]))
    try:
        from .transport.mooncake import mooncake_diagnostics
        d = mooncake_diagnostics()
        out.append(("Mooncake transfer engine (cross-host)", bool(d.get("available")), mooncake_summary(d)))
    except Exception as e:
        out.append(("Mooncake transfer engine (cross-host)", False, f"{type(e).__name__}: {e}"[:160]))
    ib = "/sys/class/infiniband"
    devs = sorted(os.listdir(ib)) if os.path.isdir(ib) else []
    out.append(("RDMA devices", bool(devs), ", ".join(devs) if devs else
                "none: protocol rdma would silently fall back to tcp; use mooncake_protocol='tcp'"))
    return out


def run() -> int:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="embresume doctor")
    t.add_column("component", overflow="fold")
    t.add_column("ok")
    t.add_column("details", overflow="fold")
    for name, ok, detail in checks():
        t.add_row(name, "[green]yes[/]" if ok else "[yellow]no[/]", detail)
    Console().print(t)
    return 0
