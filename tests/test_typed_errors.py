"""Errors a caller acts on have their own types, so that no code decides on a
message's text: a pool that does not fit (NoMemory, a ConfigError), an
address that cannot be bound (BindFailed, a PeerError)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import embresume
from conftest import child_env, make_config
from embresume.encoder import EncoderEndpoint
from embresume.errors import BindFailed, ConfigError, NoMemory, PeerError
from embresume.ipc.shm import ShmBacking


def test_a_pool_that_does_not_fit_is_no_memory():
    with pytest.raises(NoMemory) as e:
        ShmBacking.create(1 << 50)                    # 1 PiB
    assert isinstance(e.value, ConfigError) and "of shared memory" in str(e.value)
    assert embresume.NoMemory is NoMemory


def test_an_address_in_use_is_bind_failed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(BindFailed) as e:
            EncoderEndpoint(make_config("shm", encoder_endpoint=f"tcp://127.0.0.1:{port}"))
    assert isinstance(e.value, PeerError) and f"127.0.0.1:{port}" in str(e.value)
    assert embresume.BindFailed is BindFailed


def test_the_demo_gives_its_hint_for_a_pool_that_does_not_fit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "embresume", "demo", "-n", "1", "--pool-bytes", "100T"],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=child_env())
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "(demo: use --cache-buffers 1, --pool-bytes 32M or --hidden 512)" in r.stderr
    assert "Traceback" not in r.stderr
