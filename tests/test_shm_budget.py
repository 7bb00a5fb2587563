"""The shared-memory budget: pool size in bytes, a clear ConfigError (never
"Bus error") when /dev/shm is too small, nothing left behind, and the sweep of
names left by dead processes."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time

import posix_ipc
import pytest
import torch

from embresume.config import Config, blocks_for_bytes, parse_size
from embresume.errors import ConfigError
from embresume.ipc import shm as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mine() -> set:
    """This process's names in /dev/shm (other processes may come and go meanwhile)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith((f"embr-{os.getpid()}", f"sem.embr-{os.getpid()}"))}


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
    msg = S.no_space_message(4303355904, "the receive pool", (64 << 20, 64 << 20))
    assert "4.0 GiB" in msg and "4303355904" in msg and "64.0 MiB free" in msg
    assert "pool_bytes" in msg and "EMBRESUME_POOL_BYTES" in msg and "--shm-size" in msg


def test_segment_larger_than_free_space_raises_before_creating(monkeypatch):
    before = _mine()
    monkeypatch.setattr(S, "shm_free_bytes", lambda shm_dir=S.SHM_DIR: (1 << 20, 1 << 20))
    with pytest.raises(ConfigError, match="needs 2.0 MiB"):
        S.ShmSegment.create(2 << 20)
    assert _mine() == before


def test_fallocate_failure_unlinks(monkeypatch):
    import errno
    before = _mine()

    def no_space(fd, off, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S.os, "posix_fallocate", no_space)
    with pytest.raises(ConfigError, match="shared memory"):
        S.ShmSegment.create(1 << 20)
    assert _mine() == before


def test_pool_is_logged(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="embresume.shm"):
        b = S.ShmBacking.create(1 << 20)
        b.close()
    assert any("receive pool: 1.0 MiB in /dev/shm" in r.getMessage() and "free" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------- sweep
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _make(pid: int, ns: str = S._PIDNS) -> tuple[str, str]:
    name = f"/embr-{pid}{'.' + ns if ns else ''}-test-{secrets.token_hex(6)}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.close_fd()
    sem = posix_ipc.Semaphore(name + ".i", posix_ipc.O_CREX, mode=0o600)
    sem.close()
    return f"/dev/shm{name}", f"/dev/shm/sem.{name[1:]}.i"


def _rm(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def test_sweep_removes_dead_creators_only():
    dead = _make(_dead_pid())
    live_proc = subprocess.Popen(["sleep", "30"])
    live = _make(live_proc.pid)
    try:
        assert all(os.path.exists(p) for p in dead + live)
        S.sweep_stale_segments(min_age=60)
        assert all(os.path.exists(p) for p in dead)                 # too young to be swept
        removed = S.sweep_stale_segments(min_age=0)
        assert {os.path.basename(p) for p in dead} <= set(removed)
        assert not any(os.path.exists(p) for p in dead)
        assert all(os.path.exists(p) for p in live)                 # its creator still runs
    finally:
        live_proc.kill()
        live_proc.wait()
        _rm(*dead, *live)


def test_sweep_names_and_namespaces():
    assert S.new_name("pool-").startswith(f"/embr-{os.getpid()}")
    assert S.creator_pid(S.new_name("pool-")[1:]) == os.getpid()
    assert S.creator_pid("sem." + S.new_name("ring-")[1:] + ".i") == os.getpid()
    assert S.creator_pid("embr-123-pool-abc") == 123                    # names without a namespace id
    assert S.creator_pid("embr-123.zzz-pool-abc") is None               # another pid namespace: not ours to judge
    assert S.creator_pid("mp-123") is None and S.creator_pid("embr-x-1") is None
    old_style = _make(_dead_pid(), ns="")
    foreign = _make(_dead_pid(), ns="deadbeef")
    try:
        removed = S.sweep_stale_segments(min_age=0)
        assert not any(os.path.exists(p) for p in old_style)
        assert all(os.path.exists(p) for p in foreign) and not set(map(os.path.basename, foreign)) & set(removed)
    finally:
        _rm(*old_style, *foreign)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a segment to another user")
def test_sweep_leaves_other_users_alone():
    dead = _make(_dead_pid())
    try:
        for p in dead:
            os.chown(p, 65534, 65534)
        S.sweep_stale_segments(min_age=0)
        assert all(os.path.exists(p) for p in dead)
    finally:
        _rm(*dead)


def test_sweep_runs_before_first_segment(monkeypatch):
    dead = _make(_dead_pid())
    try:
        old = time.time() - 3600
        for p in dead:
            os.utime(p, (old, old))
        monkeypatch.setattr(S, "_swept_pid", None)
        seg = S.ShmSegment.create(4096)
        seg.close()
        assert not any(os.path.exists(p) for p in dead)
    finally:
        _rm(*dead)


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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


SCRIPT = textwrap.dedent("""
    import inspect, os, sys
    from embresume.config import Config
    from embresume.errors import ConfigError
    from embresume.ipc.shm import ShmBacking, ShmSegment
    cfg = Config(hidden_size=4096)
    print("POOL", cfg.pool_nbytes)
    try:
        ShmBacking.create(cfg.pool_nbytes)
        print("CREATED")
    except ConfigError as e:
        print("CONFIGERROR", e)
    from embresume import LanguageEndpoint
    if "connect" in inspect.signature(LanguageEndpoint).parameters:
        try:
            LanguageEndpoint(cfg, connect=False)
            print("ENDPOINT CREATED")
        except ConfigError as e:
            print("ENDPOINT CONFIGERROR", e)
    # space that passes the statvfs check but runs out while reserving: still a ConfigError
    a = ShmSegment.create(40 << 20)
    import embresume.ipc.shm as S
    S.shm_free_bytes = lambda shm_dir=S.SHM_DIR: (1 << 40, 1 << 40)
    try:
        ShmSegment.create(40 << 20)
        print("SECOND CREATED")
    except ConfigError as e:
        print("SECOND CONFIGERROR", e)
    a.close()
""")


def test_default_pool_in_small_shm_is_a_config_error():
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    r = _in_small_shm([sys.executable, "-c", SCRIPT])
    out = r.stdout
    assert r.returncode == 0, (r.returncode, out, r.stderr)         # 135 would be the Bus error
    assert "Bus error" not in r.stderr
    lines = out.splitlines()
    assert "CREATED" not in lines, out
    line = next(x for x in lines if x.startswith("CONFIGERROR"))
    assert "4.0 GiB" in line and "free" in line and "pool_bytes" in line and "--shm-size" in line
    if "ENDPOINT" in out:                                              # the endpoint creates its pool at once
        assert "ENDPOINT CONFIGERROR" in out, out
    assert "SECOND CONFIGERROR" in out, out
    assert out.rstrip().splitlines()[-1] == "LEFT:", out                # nothing left in that /dev/shm


def test_demo_in_small_shm_is_one_line():
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    r = _in_small_shm([sys.executable, "-m", "embresume", "demo", "-n", "5"])
    assert r.returncode in (1, 2), (r.returncode, r.stdout, r.stderr)
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr and "Bus error" not in r.stderr, r.stderr
    assert len(err) == 1 and err[0].startswith("embresume: error:"), r.stderr
    assert "shared memory" in err[0] and "--shm-size" in err[0], err[0]
    assert r.stdout.rstrip().splitlines()[-1] == "LEFT:", r.stdout
