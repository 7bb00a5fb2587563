"""The scripts in examples/ run as documented: exit 0, data verified, resumes happen."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time

import pytest

from conftest import child_env

from embresume.harness import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


def _env() -> dict:
    env = child_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Lines read until one matches ``pattern`` (fails on timeout or exit)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(pattern, line):
                return lines
        elif proc.poll() is not None:
            break
    pytest.fail(f"{proc.args[1]}: no line matching {pattern!r} within {timeout}s; output:\n{''.join(lines)}")


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def _resumes(out: str) -> list[int]:
    return [int(x) for x in re.findall(r"(\d+) resume\(s\)", out)]


def test_encoder_and_language_processes():
    address = f"tcp://127.0.0.1:{free_port()}"
    enc = _start("encoder.py", "--endpoint", address)
    lang = None
    try:
        head = _wait_for_line(enc, r"listening at", timeout=60)
        lang = _start("language.py", "--endpoint", address)
        lang_out, _ = lang.communicate(timeout=120)
        enc_out, _ = enc.communicate(timeout=60)
    finally:
        _kill(*(p for p in (enc, lang) if p is not None))
    enc_out = "".join(head) + enc_out
    assert lang.returncode == 0, lang_out
    assert enc.returncode == 0, enc_out
    assert lang_out.count("data verified") == 3 and "MISMATCH" not in lang_out, lang_out
    assert max(_resumes(lang_out)) >= 1, lang_out        # 3000 and 5000 tokens into 1024-token allocations
    assert "Traceback" not in lang_out + enc_out
    assert "encoder: done" in enc_out, enc_out


def test_tensor_parallel():
    p = _start("tensor_parallel.py")
    try:
        out, _ = p.communicate(timeout=240)
    finally:
        _kill(p)
    assert p.returncode == 0, out
    for rank in (0, 1):
        assert len(re.findall(rf"rank {rank}: .* data verified", out)) == 3, out
    assert "MISMATCH" not in out and "Traceback" not in out, out
    assert max(_resumes(out)) >= 1, out
    assert "tensor parallel: OK" in out, out
