"""A real two-host test: encoder and language rank in two network namespaces
joined by a veth pair.  The path is chosen automatically (different network
namespaces are different nodes) and the data crosses a real interface."""

import json
import os
import secrets
import shutil
import subprocess
import sys

import pytest

from conftest import child_env

pytestmark = [pytest.mark.netns, pytest.mark.mooncake]

HERE = os.path.dirname(os.path.abspath(__file__))


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    try:
        import mooncake.engine  # noqa: F401
    except Exception as e:
        pytest.skip(f"Mooncake transfer engine unavailable: {e}")
    tag = secrets.token_hex(3)
    a, b = f"embr-a-{tag}", f"embr-b-{tag}"
    va, vb = f"ea{tag}", f"eb{tag}"
    octet = 100 + int(tag, 16) % 100
    ip_a, ip_b = f"10.231.{octet}.1", f"10.231.{octet}.2"
    created = []
    try:
        for ns in (a, b):
            r = _ip("netns", "add", ns, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
            created.append(ns)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, ip_a), (b, vb, ip_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, ip_a, ip_b
    finally:
        for ns in created:
            _ip("netns", "del", ns, check=False)


def test_encoder_and_language_on_two_hosts(two_hosts):
    a, b, ip_a, ip_b = two_hosts
    endpoint = f"tcp://{ip_a}:17650"
    spec = json.dumps({"hidden": 256, "pool_blocks": 16, "timeout": 60,
                       "rooms": [[1, 1], [2, 700], [3, 1024], [4, 2000], [5, 5000]]})
    env = child_env()
    script = os.path.join(HERE, "netns_roles.py")
    enc = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, script, "encoder", endpoint, spec],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lang = subprocess.run(["ip", "netns", "exec", b, sys.executable, script, "language", endpoint, spec],
                              capture_output=True, text=True, timeout=120, env=env)
        enc_out, enc_err = enc.communicate(timeout=60)
    finally:
        if enc.poll() is None:
            enc.kill()
            enc.wait(10)
    assert lang.returncode == 0, f"language failed:\n{lang.stdout}\n{lang.stderr[-3000:]}"
    assert enc.returncode == 0, f"encoder failed:\n{enc_out}\n{enc_err[-3000:]}"
    out = json.loads(lang.stdout.strip().splitlines()[-1])
    assert out["transport"] == "mooncake"          # chosen automatically across hosts
    assert all(r["ok"] for r in out["results"].values())
    assert out["results"]["5"]["chunks"] >= 3       # a 16-block pool holds at most 2048 tokens
    assert out["free_blocks"] == out["pool_blocks"]
    enc_res = json.loads(enc_out.strip().splitlines()[-1])
    assert set(enc_res["done"].values()) == {"Success"}
    assert [p["transport"] for p in enc_res["peers"]] in ([], ["mooncake"])
