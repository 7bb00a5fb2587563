"""Process harness shared by the tests that run the real vLLM (tests/test_vllm_engine.py,
tests/test_vllm_serving.py): children in their own process groups, always killed,
every wait bounded; the OpenAI-compatible server and its metrics.

Imported by the test interpreter (standard library only; PIL for the chat
messages, through vllm_roles, only where a test sends images).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent.parent
ENGINE_DIR = ROOT / "tests" / "engine"
ROLES = ENGINE_DIR / "vllm_roles.py"


def engine_python() -> Optional[str]:
    """The engine's interpreter: ``EMBRESUME_VLLM_PYTHON`` (``.ci/run`` sets it), else
    ``.venv-vllm/bin/python``; None when neither exists."""
    env = os.environ.get("EMBRESUME_VLLM_PYTHON")
    if env:
        return env if Path(env).exists() else None
    local = ROOT / ".venv-vllm" / "bin" / "python"
    return str(local) if local.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the offline Hugging Face variables every engine process gets
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ENGINE_DIR)          # swap_connector for the swapped-payload run
    # vLLM's CPU build pins each instance's worker process, every thread in it (embresume's
    # too), to cores it picks alone: on 2 cores both instances land on core 0, where the
    # consumer's worker spins while it waits, starving the producer's encoder threads.
    # Unpinned, the kernel shares both cores (deployments give each instance its own cores)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind", **OFFLINE)
    return env


class Proc:
    """A child in its own process group: killed with its engine processes, always.
    ``env``: the child's whole environment (default :func:`_env`)."""

    def __init__(self, args, log: Path, stdin=subprocess.DEVNULL, env: Optional[dict] = None):
        self.log = log
        self._f = open(log, "w")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, stdin=stdin,
                                  cwd=str(log.parent), env=_env() if env is None else env,
                                  start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name}: still running after {timeout}s\n{self.tail()}")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return
            if self.p.poll() is not None:
                raise AssertionError(f"{self.log.name} exited ({self.p.returncode}) before {text!r}\n{self.tail()}")
            time.sleep(0.5)
        raise AssertionError(f"{self.log.name}: no {text!r} within {timeout}s\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def signal(self, sig: int) -> None:
        """``sig`` to the whole process group (the server and its engine processes)."""
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(timeout=10)
        else:
            # the leader is gone: engine processes left in its group go too
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._f.closed:
            self._f.close()


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def chat_tools():
    """vllm_roles' ``chat_message`` and ``images`` (PIL and numpy only), or ImportError."""
    sys.path.insert(0, str(ENGINE_DIR))
    try:
        from vllm_roles import chat_message, images
    finally:
        sys.path.remove(str(ENGINE_DIR))
    return chat_message, images


def metrics_counters(text: str) -> dict:
    """``vllm:embresume_ec_<name>_total`` of a Prometheus page, summed over labels."""
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("vllm:embresume_ec_") and "_total" in line:
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            key = name[len("vllm:embresume_ec_"):].replace("_total", "")
            out[key] = out.get(key, 0) + int(value)
    return out


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` needs the
    distribution to be called vllm; the CPU build's is vllm-cpu).

    ``ec``: the ``--ec-transfer-config`` (None: a plain single instance); ``args``:
    more arguments; ``argv``/``env``: the whole command and environment instead
    (``{port}`` in argv is this server's port)."""

    def __init__(self, work: Path, model: Path, name: str, ec: Optional[dict] = None, *, engine_py: str = "",
                 args=(), max_model_len: int = 512, images_per_prompt: int = 1, dtype: str = "float32",
                 argv=None, env: Optional[dict] = None, port: int = 0, timeout: float = 400, start: bool = True):
        self.name = name
        self.model = model
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if argv is None:
            argv = [engine_py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype, "--enforce-eager",
                    "--max-model-len", str(max_model_len),
                    "--limit-mm-per-prompt", json.dumps({"image": images_per_prompt, "video": 0}),
                    "--seed", "0", *args]
            if ec is not None:
                argv += ["--ec-transfer-config", json.dumps(ec)]
        self.argv, self.env, self.work, self.timeout = list(argv), env, work, timeout
        self.proc: Optional[Proc] = None
        if start:
            self.start()
            self.wait_up()

    def start(self) -> None:
        log = self.work / f"{self.name}.log"
        if self.proc is not None:            # a restart: keep the earlier log
            log = self.work / f"{self.name}-{int(time.time())}.log"
        self.proc = Proc(self.argv, log, env=self.env)

    def wait_up(self, timeout: Optional[float] = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                _get(self.url + "/health", timeout=2)
                return
            except OSError:
                if self.proc.p.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"{self.name} did not come up\n{self.proc.tail()}")
                time.sleep(1)

    def healthy(self) -> bool:
        try:
            _get(self.url + "/health", timeout=10)
            return True
        except OSError:
            return False

    def chat_body(self, image_specs: str, max_tokens: int, **more) -> dict:
        try:
            chat_message, images = chat_tools()
        except ImportError as e:
            import pytest
            pytest.skip(f"the test's own interpreter lacks PIL ({e})")
        ims = images(image_specs)
        message = chat_message(ims[0])
        for im in ims[1:]:                       # more images: more image parts before the text
            message["content"].insert(-1, chat_message(im)["content"][0])
        return dict({"model": str(self.model), "messages": [message], "max_tokens": max_tokens,
                     "temperature": 0.0}, **more)

    def chat(self, model: Path, image_spec: str, max_tokens: int, timeout: float = 120, **more) -> dict:
        return _post(self.url + "/v1/chat/completions", self.chat_body(image_spec, max_tokens, **more),
                     timeout=timeout)

    def metrics(self) -> str:
        return _get(self.url + "/metrics")

    def counters(self) -> dict:
        return metrics_counters(self.metrics())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


#: what vLLM's processes leave in /dev/shm when they are killed: its CPU TP all-reduce buffers,
#: its shared-memory broadcast queues (multiprocessing.shared_memory) and multiprocessing's semaphores
_ENGINE_SHM = ("vllm_dist_", "psm_", "sem.mp-")


def _shm_in_use() -> set:
    """/dev/shm names some live process still maps or holds open."""
    used = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.rsplit("/dev/shm/", 1)[1].split(" (deleted)")[0].strip()
                            for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):])
        except OSError:
            continue
    return used


class EngineShmSweep:
    """``with EngineShmSweep():`` around a module's engine processes: afterwards the
    /dev/shm entries vLLM's processes made meanwhile (and left, being killed) are removed,
    those no live process still uses."""

    def __enter__(self) -> "EngineShmSweep":
        self.before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        return self

    def __exit__(self, *exc) -> None:
        if not os.path.isdir("/dev/shm"):
            return
        new = {n for n in os.listdir("/dev/shm") if n.startswith(_ENGINE_SHM)} - self.before
        for name in new - _shm_in_use():
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def engine_workdir(tmp_path_factory, name: str):
    """A module's work folder for its engine processes (a generator for a module-scoped
    fixture to ``yield from``): when the fixture ends, every engine process of the module
    has stopped, and what vLLM left in /dev/shm is swept (:class:`EngineShmSweep`)."""
    with EngineShmSweep():
        yield tmp_path_factory.mktemp(name)


def build_tiny_model(engine_py: str, out: Path, *args: str, timeout: float = 300) -> Path:
    """A tiny random-weight model built offline by one of this folder's scripts:
    ``args`` are the script's name and its arguments before the output folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    p = Proc([engine_py, str(ENGINE_DIR / args[0]), *args[1:], str(out)], out.parent / f"make-{out.name}.log")
    try:
        assert p.wait(timeout) == 0, p.tail()
    finally:
        p.kill()
    return out
