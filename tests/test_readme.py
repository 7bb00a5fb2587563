"""README.md as a newcomer uses it: every python block runs as pasted, the
commands are the ones CI runs, the time claims match --help, and it stays
short enough to read."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from conftest import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


_env = child_env


def test_readme_has_python_blocks():
    assert python_blocks(_readme()), "README.md has no ```python block"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("index", range(len(python_blocks(_readme()))))
def test_python_block_runs_as_pasted(index, tmp_path):
    code = python_blocks(_readme())[index]
    for port in {int(p) for p in re.findall(r"tcp://127\.0\.0\.1:(\d+)", code)}:
        if not _port_free(port):
            pytest.skip(f"port {port}, which the README block binds, is in use on this machine")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(tmp_path), env=_env(), start_new_session=True)
    try:
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:                       # timed out (or the test failed): nothing stays behind
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    assert p.returncode == 0, f"README block {index} failed:\n{code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "Traceback" not in err


def test_example_block_prints_what_it_did():
    (code,) = [b for b in python_blocks(_readme()) if "EncoderEndpoint(" in b]
    assert len(code.strip().splitlines()) <= 20
    assert "while " not in code                    # no busy-wait loop in the example
    assert "auth_key" not in code.replace("no auth_key is needed", "")   # same host: none needed


def test_readme_is_short():
    assert len(_readme().splitlines()) <= 300


def _indented_commands(text: str, section: str) -> list[str]:
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [line[4:] for line in body.splitlines() if line.startswith("    ") and not line.startswith("     ")]


def test_the_two_commands_are_what_ci_runs():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    cmds = [c for c in _indented_commands(_readme(), "The two commands") if c.startswith("apt-get update")]
    assert len(cmds) == 2, cmds
    for cmd in cmds:
        steps = [s.strip() for s in cmd.split("&&")]
        install = re.search(r"apt-get install -y (.*)", steps[1]).group(1).split()
        ci_install = re.search(r"apt-get install -y -q (.*?) >/dev/null", ci).group(1).split()
        assert install == ci_install, (install, ci_install)
        for step in ("python3 -m venv .venv", ". .venv/bin/activate"):
            assert step in steps and step in ci
        for step in (s for s in steps if s.startswith("pip install")):
            assert step.replace("pip install", "pip install -q") in ci, step
    assert cmds[0].endswith("&& embresume demo")
    assert cmds[1].endswith("&& python -m pytest -q") and "python -m pytest -q" in ci
    # the engine wheels line the README quotes is CI's
    engines = [c for c in _indented_commands(_readme(), "The two commands") if "--no-deps" in c]
    assert engines and all(c in ci for c in engines), engines


def test_time_claims_agree_with_help():
    from embresume.bench import run as bench_run
    text = " ".join(_readme().split())
    help_text = " ".join(bench_run.DESCRIPTION.split())
    assert "--quick (about a minute on a 2-core machine)" in help_text
    assert "about six minutes" in help_text
    assert "`embresume bench --quick` (about a minute on 2 cores" in text
    assert "full profile, about six minutes" in text
    assert "Tests** (about 20 minutes on 2 cores; about 35 with the engines" in text
