"""The shared-memory budget: pool size in bytes, a clear ConfigError (never
"Bus error") when the machine cannot hold the pool, sealed segments no peer
can shrink, and nothing named anywhere (so nothing to leave behind)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from embresume.config import Config, blocks_for_bytes, parse_size
from embresume.errors import ConfigError
from embresume.ipc import shm as S

from conftest import child_env, fd_links

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _memfds() -> set:
    """This process's embresume memfds."""
    return fd_links("/memfd:embresume")


# ---------------------------------------------------------------- config
def test_parse_size():
    assert parse_size(4096) == 4096
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("64 k") == 64 << 10
    for bad in ("", "lots", "12Q", "-1G", "0", 0, -5, True, None, 1.5):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_default_pool_bytes(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("EMBRESUME_", "SGLANG_")):
            monkeypatch.delenv(k)
    c = Config()
    # 64 default allocations of 8192 tokens x 4096 x bf16: 4 GiB of embeddings plus metadata
    assert c.total_pool_blocks == 4096
    assert c.pool_nbytes == (4 << 30) + 4096 * 128 * 4 + 4096 * 3 * 128 * 4 + 4096 * 16 * 4
    assert c.pool_nbytes == 4303618048       # 4.0 GiB, quoted in README


def test_pool_bytes_precedence(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("EMBRESUME_", "SGLANG_")):
            monkeypatch.delenv(k)
    c = Config(hidden_size=1024, pool_bytes="64M")
    n = c.total_pool_blocks
    assert c.pool_nbytes <= 64 << 20
    assert Config(hidden_size=1024, pool_blocks=n + 1).pool_nbytes > 64 << 20   # n is the largest that fits
    assert n == blocks_for_bytes(64 << 20, 128, 1024, torch.bfloat16)
    assert Config(hidden_size=1024, pool_bytes=64 << 20, pool_blocks=7).total_pool_blocks == 7   # blocks win
    assert Config(hidden_size=1024, pool_bytes=64 << 20, cache_buffers=1).total_pool_blocks == n  # bytes beat buffers
    monkeypatch.setenv("EMBRESUME_POOL_BYTES", "32M")
    assert Config(hidden_size=1024).pool_nbytes <= 32 << 20
    assert Config(hidden_size=1024, pool_bytes="64M").total_pool_blocks == n       # explicit beats env
    monkeypatch.setenv("EMBRESUME_POOL_BYTES", "a lot")
    with pytest.raises(ConfigError, match="EMBRESUME_POOL_BYTES"):
        Config()
    monkeypatch.delenv("EMBRESUME_POOL_BYTES")
    with pytest.raises(ConfigError, match="smaller than one block"):
        Config(hidden_size=4096, pool_bytes="64K")
    with pytest.raises(ConfigError):
        Config(pool_bytes=-1)
    # exact fits: every size from one block up gives a pool that fits
    one = Config(hidden_size=64, pool_blocks=1).pool_nbytes
    for nbytes in (one, one + 1, 10 << 20, (10 << 20) + 12345):
        c = Config(hidden_size=64, pool_bytes=nbytes)
        assert c.pool_nbytes <= nbytes < Config(hidden_size=64, pool_blocks=c.total_pool_blocks + 1).pool_nbytes


def test_no_space_message_names_size_free_and_fix():
    msg = S.no_space_message(4303355904, "the receive pool", (64 << 20, 8 << 30))
    assert "4.0 GiB" in msg and "4303355904" in msg and "64.0 MiB available" in msg
    assert "pool_bytes" in msg and "EMBRESUME_POOL_BYTES" in msg and "memory limit" in msg


def test_segment_larger_than_free_memory_raises_before_creating(monkeypatch):
    before = _memfds()
    monkeypatch.setattr(S, "memory_free_bytes", lambda: (1 << 20, 1 << 30))
    with pytest.raises(ConfigError, match="needs 2.0 MiB"):
        S.ShmSegment.create(2 << 20)
    assert _memfds() == before


def test_fallocate_failure_is_a_config_error_and_closes(monkeypatch):
    before = _memfds()

    def no_space(fd, off, size):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(S.os, "posix_fallocate", no_space)
    with pytest.raises(ConfigError, match="shared memory"):
        S.ShmSegment.create(1 << 20)
    assert _memfds() == before


def test_memory_free_bytes_is_sane():
    free = S.memory_free_bytes()
    assert free is not None
    assert 0 < free[0] <= free[1]


def test_pool_is_logged(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="embresume.shm"):
        b = S.ShmBacking.create(1 << 20)
        b.close()
    assert any("receive pool: 1.0 MiB of shared memory" in r.getMessage() and "available" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------- sealed, unnamed
def test_segment_is_sealed_unnamed_and_shared():
    s = S.ShmSegment.create(8192, tag="pool")
    try:
        assert os.readlink(f"/proc/self/fd/{s.fd}").startswith("/memfd:embresume-pool")
        assert fcntl.fcntl(s.fd, fcntl.F_GET_SEALS) & S.SEALS == S.SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(s.fd, 4096)                # nobody can shrink it under a mapping
        with pytest.raises(PermissionError):
            os.ftruncate(s.fd, 1 << 20)
        s.raw[:4] = 7
        t = S.ShmSegment.from_fd(s.fd, 8192)
        assert int(t.raw[3]) == 7
        t.raw[0] = 9
        assert int(s.raw[0]) == 9
        t.close()
    finally:
        s.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(("embr-", "sem.embr-"))]


def test_peer_segment_must_be_sealed_and_large_enough():
    plain = os.memfd_create("x", os.MFD_CLOEXEC)                            # sealing not allowed
    sealable = os.memfd_create("y", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)  # allowed, not sealed
    small = S.ShmSegment.create(4096)
    try:
        os.ftruncate(plain, 8192)
        os.ftruncate(sealable, 8192)
        with pytest.raises(ValueError, match="not sealed"):
            S.ShmSegment.from_fd(plain, 8192)
        with pytest.raises(ValueError, match="not sealed"):
            S.ShmSegment.from_fd(sealable, 8192)
        with pytest.raises(ValueError, match="4096 bytes, expected at least 8192"):
            S.ShmSegment.from_fd(small.fd, 8192)
        r, w = os.pipe()
        try:
            with pytest.raises(ValueError, match="not a sealable memfd"):
                S.ShmSegment.from_fd(r, 4096)
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(plain)
        os.close(sealable)
        small.close()


# ---------------------------------------------------------------- a 64 MiB /dev/shm
def _unshare_reason():
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if r.returncode != 0:
        return f"unshare -m does not work here: {r.stderr.decode().strip()}"
    return None


def _in_small_shm(argv: list[str], size: str = "64m", timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``argv`` with a fresh ``size`` tmpfs on /dev/shm (private mount namespace);
    the last stdout line is ``LEFT:<what is in that /dev/shm afterwards>``."""
    shell = ('mount -t tmpfs -o size=%s,mode=1777 tmpfs /dev/shm || exit 99; "$@"; rc=$?; '
             'echo "LEFT:$(ls -A /dev/shm | tr "\\n" " ")"; exit $rc' % size)
    env = child_env()
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


SCRIPT = textwrap.dedent("""
    from embresume.config import Config
    from embresume import LanguageEndpoint
    cfg = Config(hidden_size=1024, pool_bytes="256M")
    with LanguageEndpoint(cfg, connect=False) as lang:
        lang.pool.backing.raw[-1] = 1      # the last page is there: 4x what /dev/shm could hold
        print("ENDPOINT CREATED", cfg.pool_nbytes)
""")


def test_pool_does_not_depend_on_dev_shm():
    """Docker's 64 MiB /dev/shm no longer limits the pool (memfds are not in it)."""
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    r = _in_small_shm([sys.executable, "-c", SCRIPT])
    out = r.stdout
    assert r.returncode == 0, (r.returncode, out, r.stderr)
    assert "ENDPOINT CREATED" in out, out
    assert out.rstrip().splitlines()[-1] == "LEFT:", out                # nothing in that /dev/shm


def test_demo_in_small_shm_runs_and_leaves_nothing():
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    r = _in_small_shm([sys.executable, "-m", "embresume", "demo", "-n", "5"])
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Bus error" not in r.stderr, r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "LEFT:", r.stdout


# ---------------------------------------------------------------- prefault: page faults counted
def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


PAGES = 4096                                     # 16 MiB: about one item of a 7B-wide model


def _populate_works() -> bool:
    """madvise(MADV_POPULATE_*) exists here (Linux 5.14 and later)."""
    import mmap
    m = mmap.mmap(-1, 4096)
    try:
        return S._populate(m, write=False)
    finally:
        m.close()


needs_populate = pytest.mark.skipif(not _populate_works(), reason="this kernel has no MADV_POPULATE_* (before 5.14)")


def _write_faults(raw: torch.Tensor) -> int:
    import numpy as np
    src = np.ones(PAGES * 4096, np.uint8)
    f0 = _minor_faults()
    np.copyto(raw[:PAGES * 4096].numpy(), src)
    return _minor_faults() - f0


def _read_faults(raw: torch.Tensor) -> int:
    import numpy as np
    dst = np.zeros(PAGES * 4096, np.uint8)
    dst[:] = 2                                   # this process's own pages, faulted in first
    f0 = _minor_faults()
    np.copyto(dst, raw[:PAGES * 4096].numpy())
    return _minor_faults() - f0


@needs_populate
def test_prefault_maps_a_new_segment_up_front():
    """A prefaulted segment takes no page fault on its first write (a fault per 4 KiB page
    made a 16.5 MB copy 6x slower); without prefault the same write faults on every page,
    which shows the count sees them."""
    cold = S.ShmSegment.create(PAGES * 4096, tag="cold", prefault=False)
    warm = S.ShmSegment.create(PAGES * 4096, tag="warm", prefault=True)
    try:
        assert _write_faults(cold.raw) >= PAGES // 2
        assert _write_faults(warm.raw) < PAGES // 16
    finally:
        cold.close()
        warm.close()


@needs_populate
def test_prefault_of_a_mapped_fd_is_for_reading_and_opt_in():
    """``from_fd(prefault=True)`` (a worker's view of its scheduler's region) reads without
    faults; a peer's pool is mapped without prefault (``ShmBacking.from_fd``'s default), so
    pages the peer left unallocated stay unallocated."""
    seg = S.ShmSegment.create(PAGES * 4096, tag="src", prefault=True)
    try:
        seg.raw.fill_(1)
        cold = S.ShmSegment.from_fd(seg.fd, PAGES * 4096)
        warm = S.ShmSegment.from_fd(seg.fd, PAGES * 4096, prefault=True)
        try:
            cold_faults, warm_faults = _read_faults(cold.raw), _read_faults(warm.raw)
        finally:
            cold.close()
            warm.close()
        assert cold_faults >= PAGES // 32                  # read faults map 16 pages each at most
        assert warm_faults < PAGES // 64
    finally:
        seg.close()
    # a sparse sealed memfd (the shape a careless or hostile peer could pass): mapping it
    # allocates none of its pages
    fd = os.memfd_create("embresume-test-sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, PAGES * 4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, S.SEALS)
        backing = S.ShmBacking.from_fd(fd, PAGES * 4096)
        assert os.fstat(fd).st_blocks == 0
        backing.close()
    finally:
        os.close(fd)
