"""embresume inside the real vLLM under serving conditions: OpenAI-compatible
server processes (``python -m vllm.entrypoints.openai.api_server``) on 127.0.0.1.

What runs (vLLM's CPU build, tiny random models built offline):

* ``TestPair``: one plain reference server, one producer (encoder) server and
  one TP=2 consumer server whose landing region holds only two items, shared by
  the scenarios: a concurrent batch of two-image prompts, the EPD flow (the
  producer's ``ec_transfer_params`` forwarded by a proxy function), hostile
  ``ec_transfer_params``, a client that disconnects while its item transfers,
  and the producer killed (SIGKILL) while items are in flight, then restarted
  on the same address.
* ``TestQwen3VL``: a tiny Qwen3-VL (DeepStack: an item is 4x the LM width),
  reference, producer, consumer (its chunks hold half an item: every item is
  resumed); routed by ``encoder_addresses`` alone and by forwarded
  ``ec_transfer_params``.
* ``test_docs_commands``: the server pair started exactly as
  docs/integrations.md's "### Run it" says, then SIGTERM and each side's totals
  line in its log.

The proof that items came through embresume and not from vLLM's silent
fallback (a consumer that still has its vision tower encodes a missing item
and gives the same tokens): the consumer server's ``/metrics``
(``vllm:embresume_ec_*_total``: items received, no local encode, no
recompute) next to tokens equal to a single instance's.

Engine interpreter and skips as in tests/test_vllm_engine.py.  Every process
is bounded in time and killed when a test fails (tests/engine/harness.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "engine"))
from harness import OFFLINE, build_tiny_model, engine_workdir, ROOT, Server, _free_port, _post, engine_python  # noqa: E402

ENGINE_PY = engine_python()
_why = None
if ENGINE_PY is None:
    _why = ("no vLLM engine environment (set EMBRESUME_VLLM_PYTHON or run "
            "`bash tests/engine/setup_venv.sh`)")
if _why and os.environ.get("EMBRESUME_REQUIRE_ENGINES") == "1":
    raise RuntimeError(f"EMBRESUME_REQUIRE_ENGINES=1 but {_why}")
if _why:
    pytest.skip(_why, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WIDTH, ITEMSIZE = 128, 4            # the tiny Qwen2-VL's LM width, fp32
ITEM_TOKENS = 16                    # a 112x112 image (the processor's largest)
# generous timeouts: on a loaded 2-core machine a fail-over would recompute, which the
# tests count as a failure (a killed producer resets its connections: no timeout needed)
EXTRA = {"block_size": 4, "failover_timeout": 30, "request_timeout": 90, "handshake_timeout": 30,
         "peer_timeout": 30}
BASE = {"ec_connector": "EmbresumeECConnector", "ec_connector_module_path": "embresume.integrations.vllm"}
CONSUMER_TP = 2


def specs(*seeds: int, size: int = 112) -> list[str]:
    return [f"{size}:{s}" for s in seeds]


def token_ids(resp: dict) -> list[int]:
    return list(resp["choices"][0]["token_ids"])


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def assert_through_embresume(d: dict, items: int, *, width: int = WIDTH, tokens: int = ITEM_TOKENS,
                             resumes: int = 0) -> None:
    """Counter deltas of a consumer that received ``items`` items of ``tokens`` rows each
    (at least ``resumes`` resumes among them)."""
    assert d.get("items_received", 0) == items, d
    assert d.get("resumes", 0) >= resumes, d
    assert d.get("bytes_received", 0) == items * tokens * width * ITEMSIZE, d
    assert d.get("local_encodes", 0) == 0, d
    assert d.get("recomputes", 0) == 0, d
    assert d.get("transfer_failures", 0) == 0, d
    assert d.get("unavailable", 0) == 0, d


class Ref:
    """A plain single instance (no EC connector): the tokens every test compares with."""

    def __init__(self, server: Server):
        self.server = server
        self._memo: dict = {}
        self._up = False

    def tokens(self, image_specs: str, max_tokens: int = 8) -> list[int]:
        if not self._up:        # started beside the pair: waited for at first use
            self.server.wait_up()
            self._up = True
        key = (image_specs, max_tokens)
        if key not in self._memo:
            self._memo[key] = token_ids(self.server.chat(None, image_specs, max_tokens, return_token_ids=True))
        return self._memo[key]


def ask(server: Server, image_specs: str, max_tokens: int = 8, timeout: float = 240, **more) -> dict:
    return server.chat(server.model, image_specs, max_tokens, timeout=timeout, return_token_ids=True, **more)


def metadata_only(consumer: Server, image_specs: str, params: dict, max_tokens: int = 8,
                  timeout: float = 240) -> dict:
    """The EPD flow's language request as vLLM's proxy sends it: the prompt rendered by the
    consumer (``/v1/chat/completions/render``), its items' pixels dropped (metadata only:
    placeholders and grid), the producer's ``ec_transfer_params``, to ``/inference/v1/generate``
    (the server needs ``--enable-scale-out``)."""
    rendered = _post(consumer.url + "/v1/chat/completions/render", consumer.chat_body(image_specs, max_tokens),
                     timeout=60)
    features = rendered["features"]
    assert features.get("mm_metadata"), f"the render gave no metadata-only form: {list(features)}"
    features["kwargs_data"] = None
    rendered["ec_transfer_params"] = params
    rendered["sampling_params"].update(max_tokens=max_tokens, temperature=0.0)
    return _post(consumer.url + "/inference/v1/generate", rendered, timeout=timeout)


def encode(producer: Server, image_specs: str) -> dict:
    """The encoder instance encodes (and publishes) the images: one token, its ec_transfer_params."""
    return ask(producer, image_specs, 1)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    yield from engine_workdir(tmp_path_factory, "vllm-serving")


@pytest.fixture(scope="module")
def model(work, tiny_qwen2vl):
    return tiny_qwen2vl


@pytest.fixture(scope="module")
def ref(work, model):
    server = Server(work, model, "reference", engine_py=ENGINE_PY, images_per_prompt=2, start=False)
    server.start()
    try:
        yield Ref(server)
    finally:
        server.stop()


# ---------------------------------------------------------------- the shared Qwen2-VL pair
class Pair:
    def __init__(self, work: Path, model: Path):
        self.encoder = f"tcp://127.0.0.1:{_free_port()}"
        # the landing region fits two 16-token items, no more
        self.landing = 2 * ITEM_TOKENS * WIDTH * ITEMSIZE
        self.producer = Server(work, model, "producer", dict(BASE, ec_role="ec_producer", ec_connector_extra_config=dict(
            EXTRA, encoder_address=self.encoder)), engine_py=ENGINE_PY, images_per_prompt=2, start=False)
        self.consumer = Server(work, model, "consumer", dict(BASE, ec_role="ec_consumer", ec_connector_extra_config=dict(
            EXTRA, encoder_addresses=[self.encoder], landing_bytes=self.landing)), engine_py=ENGINE_PY,
            images_per_prompt=2, args=("--tensor-parallel-size", str(CONSUMER_TP), "--enable-scale-out"),
            start=False)
        # both start at once (the 2 cores are shared either way)
        self.producer.start()
        self.consumer.start()
        self.producer.wait_up()
        self.consumer.wait_up()

    def stop(self) -> None:
        for s in (self.consumer, self.producer):
            s.stop()

    def tails(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.proc.tail(25)}" for s in (self.producer, self.consumer))


@pytest.fixture(scope="class")
def pair(work, model, ref):
    p = Pair(work, model)
    try:
        yield p
    finally:
        p.stop()


class TestPair:
    def test_concurrent_batch_on_a_two_item_landing_region(self, pair, ref):
        """12 different images in 6 two-image prompts, all at once, to a consumer (TP=2) whose
        landing region holds two items: every answer the reference's, each item received about
        once, nothing recomputed, the engine alive."""
        prompts = [",".join(specs(2 * i + 1, 2 * i + 2)) for i in range(6)]
        want = [ref.tokens(p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(lambda p: encode(pair.producer, p), prompts))
        before = pair.consumer.counters()
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: token_ids(ask(pair.consumer, p)), prompts))
        d = delta(pair.consumer.counters(), before)
        assert pair.consumer.healthy(), pair.tails()
        assert got == want, pair.tails()
        n = 2 * len(prompts)
        assert n <= d.get("items_received", 0) <= 1.5 * n, d
        assert d.get("recomputes", 0) == 0, d
        assert d.get("local_encodes", 0) == 0, d
        assert d.get("unavailable", 0) == 0, d

    def test_tp2_consumer_receives_every_item(self, pair, ref):
        """The consumer runs TP=2 (one landing region every worker maps): one item at a time."""
        before = pair.consumer.counters()
        got = []
        for spec in specs(21, 22):
            encode(pair.producer, spec)
            got.append(token_ids(ask(pair.consumer, spec)))
        assert got == [ref.tokens(s) for s in specs(21, 22)]
        d = delta(pair.consumer.counters(), before)
        assert_through_embresume(d, 2)
        # both workers copied each item into their encoder cache (vLLM's V1 runner collects no
        # worker-side counter: 0 in /metrics there)
        if d.get("items_loaded"):
            assert d["items_loaded"] in (2, 2 * CONSUMER_TP), d

    def test_epd_flow_forwards_the_producers_params(self, pair, ref):
        """A proxy: the producer's response carries ec_transfer_params, forwarded as the
        consumer request's ``ec_transfer_params``."""
        prompt = ",".join(specs(31, 32))
        produced = encode(pair.producer, prompt)
        params = produced.get("ec_transfer_params")
        assert isinstance(params, dict) and len(params) == 2, produced
        for entry in params.values():
            assert entry.get("embresume_encoder") == pair.encoder, params
            assert entry.get("width") == WIDTH and entry.get("num_embeds") == ITEM_TOKENS, params
        before = pair.consumer.counters()
        got = token_ids(ask(pair.consumer, prompt, ec_transfer_params=params))
        assert got == ref.tokens(prompt)
        assert_through_embresume(delta(pair.consumer.counters(), before), 2)

    def test_epd_flow_metadata_only(self, pair, ref):
        """The proxy sends the consumer metadata-only items (no pixels): only embresume can
        give it the embeddings."""
        prompt = ",".join(specs(33, 34))
        params = encode(pair.producer, prompt)["ec_transfer_params"]
        before = pair.consumer.counters()
        out = metadata_only(pair.consumer, prompt, params)
        assert out["choices"][0]["token_ids"] == ref.tokens(prompt), out
        assert_through_embresume(delta(pair.consumer.counters(), before), 2)

    def test_hostile_params_are_refused(self, pair, ref):
        """ec_transfer_params naming an encoder the consumer was not given, or an absurd width:
        nobody ever connects to that address, the request is answered correctly or refused, the
        server stays healthy, and ``params_refused`` counts them."""
        # a same-host encoder is reached over the abstract Unix socket named after its tcp
        # address, any other over tcp: listen on both, record whatever connects
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        rogue = f"tcp://127.0.0.1:{tcp.getsockname()[1]}"
        from embresume.ipc import unix
        local = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)     # what embresume's handshake uses
        local.bind(unix.socket_name(rogue))
        listeners = [tcp, local]
        for sock in listeners:
            sock.listen(16)
            sock.settimeout(0.1)
        connections: list = []
        stop = threading.Event()

        def accept():
            while not stop.is_set():
                for sock in listeners:
                    try:
                        conn, peer = sock.accept()
                    except (socket.timeout, OSError):
                        continue
                    connections.append((sock.family.name, peer))
                    conn.close()

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        outcomes = []
        try:
            before = pair.consumer.counters()
            for spec, tamper in ((specs(41)[0], "address"), (specs(42)[0], "width")):
                params = encode(pair.producer, spec)["ec_transfer_params"]
                for entry in params.values():
                    if tamper == "address":
                        entry["embresume_encoder"] = rogue
                    else:
                        entry["width"] = 65536
                if tamper == "address":
                    params["embresume_encoder"] = rogue
                try:
                    got = token_ids(ask(pair.consumer, spec, ec_transfer_params=params))
                    assert got == ref.tokens(spec), (tamper, got)
                    outcomes.append((tamper, "answered"))
                except urllib.error.HTTPError as e:     # refused with an error response
                    outcomes.append((tamper, f"HTTP {e.code}"))
                assert pair.consumer.healthy(), pair.tails()
            time.sleep(1.0)
            after = pair.consumer.counters()
        finally:
            stop.set()
            t.join(5)
            for sock in listeners:
                sock.close()
        assert connections == [], f"the consumer connected to the address the params named: {connections}"
        d = delta(after, before)
        assert "params_refused" in after, f"no params_refused counter in /metrics ({outcomes}, {d})"
        assert d.get("params_refused", 0) >= 2, (outcomes, d)

    def test_client_disconnect_while_transferring(self, pair, ref):
        """A client closes its connection right after sending: the consumer stays healthy and
        the same image, asked again, is served through embresume (no local encode)."""
        spec = specs(51)[0]
        encode(pair.producer, spec)
        body = json.dumps(pair.consumer.chat_body(spec, 8, return_token_ids=True)).encode()
        before = pair.consumer.counters()
        for _ in range(3):      # three clients that go away
            with socket.create_connection(("127.0.0.1", pair.consumer.port), timeout=10) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                time.sleep(0.05)
        time.sleep(2.0)
        assert pair.consumer.healthy(), pair.tails()
        got = token_ids(ask(pair.consumer, spec))
        assert got == ref.tokens(spec)
        d = delta(pair.consumer.counters(), before)
        assert d.get("local_encodes", 0) == 0 and d.get("recomputes", 0) == 0, d
        assert d.get("unavailable", 0) == 0, d
        assert 1 <= d.get("items_received", 0) <= 4, d     # at most once per request
        # the pool and the region back to idle: nothing in flight, no pool block held, no pin,
        # nothing held in the pool (the item arrived in one chunk: the worker read it from the
        # pool, whose blocks went back once it was loaded; resumed items would stay in the
        # region as a cache, so landing_bytes_used need not be 0)
        gauges = {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
                  for line in pair.consumer.metrics().splitlines()
                  if line.startswith("vllm:embresume_ec_") and "_total" not in line and "_seconds" not in line
                  and not line.startswith("#")}
        for name in ("items_in_flight", "pool_blocks_used", "landing_items_pinned", "pool_items_held"):
            assert gauges.get(f"vllm:embresume_ec_{name}") == 0, gauges
        assert d.get("items_held_in_pool", 0) == d.get("items_received"), d

    def test_producer_killed_mid_flight_then_restarted(self, pair, ref):
        """SIGKILL to the producer while its items are asked for: requests that carry pixels
        are recomputed by the consumer (right tokens), the consumer stays up; the producer
        restarted on the same addresses serves later requests through embresume again."""
        prompts = specs(61, 62, 63, 64, 65, 66)
        want = [ref.tokens(p) for p in prompts]
        for p in prompts:
            encode(pair.producer, p)
        # published, never asked for before the kill: metadata-only requests for them later
        orphans = {p: encode(pair.producer, p)["ec_transfer_params"] for p in specs(69, 70)}
        before = pair.consumer.counters()
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(lambda p=p: token_ids(ask(pair.consumer, p))) for p in prompts[:2]]
            time.sleep(0.3)
            pair.producer.proc.signal(signal.SIGKILL)
            futures += [pool.submit(lambda p=p: token_ids(ask(pair.consumer, p))) for p in prompts[2:]]
            got = [f.result() for f in futures]
        pair.producer.proc.wait(30)
        pair.producer.proc.kill()
        d = delta(pair.consumer.counters(), before)
        assert got == want, pair.tails()
        assert pair.consumer.healthy(), pair.tails()
        assert d.get("recomputes", 0) > 0, d
        assert d.get("unavailable", 0) == 0, d
        # metadata-only requests cannot be recomputed: vLLM fails them, the engine stays up
        before = pair.consumer.counters()
        for p, params in orphans.items():
            try:
                out = metadata_only(pair.consumer, p, params)
                choice = out["choices"][0]
                assert choice.get("finish_reason") not in ("length", "stop"), (p, out)
            except urllib.error.HTTPError as e:
                assert e.code >= 400
        d = delta(pair.consumer.counters(), before)
        assert d.get("unavailable", 0) == len(orphans), d
        assert d.get("recomputes", 0) == 0 and d.get("local_encodes", 0) == 0, d
        assert pair.consumer.healthy(), pair.tails()
        # the producer again, same HTTP port, same encoder address
        pair.producer.start()
        pair.producer.wait_up()
        later = specs(67, 68)
        before = pair.consumer.counters()
        got = []
        for p in later:
            encode(pair.producer, p)
            got.append(token_ids(ask(pair.consumer, p)))
        # and a metadata-only one, with the restarted producer's params
        last = specs(60)[0]
        out = metadata_only(pair.consumer, last, encode(pair.producer, last)["ec_transfer_params"])
        got.append(out["choices"][0]["token_ids"])
        assert got == [ref.tokens(p) for p in later + [last]]
        assert_through_embresume(delta(pair.consumer.counters(), before), 3)


# ---------------------------------------------------------------- Qwen3-VL (DeepStack)
Q3_WIDTH = 128 * (1 + 3)            # LM width x (1 + DeepStack levels)
Q3_TOKENS = 16                      # a 128x128 image
# the consumer's chunks hold 8 tokens: every 16-token item is resumed once, so the wide
# DeepStack rows go through the resume and the merge inside a server
Q3_CONSUMER = dict(EXTRA, max_chunk_tokens=8)


@pytest.fixture(scope="class")
def qwen3(work):
    out = build_tiny_model(ENGINE_PY, work / "tiny-qwen3-vl", "make_tiny_wide.py", "--small", "qwen3_vl")
    encoder = f"tcp://127.0.0.1:{_free_port()}"
    kw = dict(engine_py=ENGINE_PY, max_model_len=1024, start=False)
    servers = [Server(work, out, "q3-reference", **kw),
               Server(work, out, "q3-producer", dict(BASE, ec_role="ec_producer", ec_connector_extra_config=dict(
                   EXTRA, encoder_address=encoder)), **kw),
               Server(work, out, "q3-consumer", dict(BASE, ec_role="ec_consumer", ec_connector_extra_config=dict(
                   Q3_CONSUMER, encoder_addresses=[encoder])), **kw)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_up()
        yield servers
    finally:
        for s in reversed(servers):
            s.stop()


class TestQwen3VL:
    def test_routed_by_encoder_addresses(self, qwen3):
        """No ec_transfer_params: the consumer must know an item's width (4x its LM's) itself."""
        reference, producer, consumer = qwen3
        before = consumer.counters()
        got, want = [], []
        for spec in specs(71, 72, size=128):
            want.append(token_ids(ask(reference, spec)))
            encode(producer, spec)
            got.append(token_ids(ask(consumer, spec)))
        d = delta(consumer.counters(), before)
        assert got == want, consumer.proc.tail(30)
        assert_through_embresume(d, 2, width=Q3_WIDTH, tokens=Q3_TOKENS, resumes=2)

    def test_routed_by_forwarded_params(self, qwen3):
        reference, producer, consumer = qwen3
        before = consumer.counters()
        got, want = [], []
        for spec in specs(73, 74, size=128):
            want.append(token_ids(ask(reference, spec)))
            params = encode(producer, spec)["ec_transfer_params"]
            assert [e.get("width") for e in params.values()] == [Q3_WIDTH], params
            got.append(token_ids(ask(consumer, spec, ec_transfer_params=params)))
        d = delta(consumer.counters(), before)
        assert got == want, consumer.proc.tail(30)
        assert_through_embresume(d, 2, width=Q3_WIDTH, tokens=Q3_TOKENS, resumes=2)


# ---------------------------------------------------------------- the documented commands
DOCS = ROOT / "docs" / "integrations.md"


def docs_commands(text: str) -> list[tuple[dict, list[str]]]:
    """The ``python -m vllm.entrypoints.openai.api_server`` commands of the vLLM "### Run it"
    section: (environment assignments, argv) each, continuations joined, shell-quoted."""
    start = text.index("### Run it")
    end = text.find("\n### ", start + 1)
    section = text[start:end if end > 0 else None]
    # every indented block (a code block) or fenced block
    blocks, cur = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("    ") or (cur and cur[-1].rstrip().endswith("\\")) or (cur and line.startswith("\t")):
            cur.append(line)
        else:
            if cur:
                blocks.append("\n".join(cur))
            cur = []
    blocks += re.findall(r"```[a-z]*\n(.*?)```", section, re.S)
    out = []
    for block in blocks:
        if "vllm.entrypoints.openai.api_server" not in block:
            continue
        joined = re.sub(r"\\\n", " ", block)
        words = shlex.split(joined, comments=False)
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if words and words[0] == "env":
            words.pop(0)
            while words and "=" in words[0]:
                k, v = words.pop(0).split("=", 1)
                env[k] = v
        out.append((env, words))
    return out


#: seconds the producer's worker is stopped in test_docs_commands (under the connector's
#: failover_timeout and peer_timeout defaults, over the library's 3 s peer_timeout)
PRODUCER_STALL = 8.0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def embresume_lines(server: Server, n: int = 40) -> str:
    """The last ``n`` lines of a server's log that embresume wrote (what a failure needs)."""
    lines = [line for line in server.proc.log.read_text(errors="replace").splitlines()
             if "embresume" in line or re.search(r"\[(language|encoder|logutil|_vllm_\w+|vllm)\.py:\d+\]", line)]
    return "\n".join(lines[-n:])


def test_docs_commands(work, model):
    """The docs' two commands, as written (ports and $MODEL substituted), no other
    environment than theirs and the offline Hugging Face variables; the reference is the
    consumer's command without its --ec-transfer-config.  The third image is fetched while the
    producer's worker is stopped for PRODUCER_STALL seconds: with the connector's defaults it
    still comes through embresume on the first attempt (before: 2 failovers)."""
    cmds = docs_commands(DOCS.read_text())
    assert len(cmds) == 2, cmds
    tcp = _free_port()
    ports = {"8100": str(_free_port()), "8200": str(_free_port())}
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("VLLM_", "EMBRESUME_", "OMP_", "PYTHONPATH"))}
    base_env.update(OFFLINE, PYTHONUNBUFFERED="1")   # unbuffered: the log shows what a terminal would

    def server(name: str, env_vars: dict, argv: list[str], ref: bool = False) -> Server:
        argv = [w.replace("$MODEL", str(model)).replace("${MODEL}", str(model)).replace("17600", str(tcp))
                for w in argv]
        argv = [ports.get(w, w) for w in argv]
        if argv[0] in ("python", "python3"):
            argv[0] = ENGINE_PY
        port = int(argv[argv.index("--port") + 1])
        if ref:                 # the same command without the connector, on its own port
            i = argv.index("--ec-transfer-config")
            argv = argv[:i] + argv[i + 2:]
            port = _free_port()
            argv[argv.index("--port") + 1] = str(port)
        env = dict(base_env, **{k: v.replace("$MODEL", str(model)) for k, v in env_vars.items()})
        return Server(work, model, name, argv=argv, env=env, port=port, start=False)

    (penv, pargv), (cenv, cargv) = cmds
    assert "ec_producer" in " ".join(pargv) and "ec_consumer" in " ".join(cargv), cmds
    servers = [server("docs-producer", penv, pargv), server("docs-consumer", cenv, cargv),
               server("docs-reference", cenv, cargv, ref=True)]
    producer, consumer, reference = servers
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_up()
        before = consumer.counters()
        got, want = [], []
        for spec in ("112:81", "56:82"):
            want.append(token_ids(ask(reference, spec)))
            encode(producer, spec)
            got.append(token_ids(ask(consumer, spec)))
        # a producer that stalls for PRODUCER_STALL seconds (its worker, where the encoder
        # endpoint's threads run, stopped: what a busy host, the engine's own loop or a long
        # collection do to them) while the consumer fetches: the item still comes through
        # embresume, on the first attempt, the link kept (the connector's defaults)
        spec = "84:83"
        want.append(token_ids(ask(reference, spec)))
        encode(producer, spec)
        workers = [int(p) for p in sorted(set(re.findall(r"\(Worker pid=(\d+)\)", producer.proc.log.read_text(
            errors="replace"))))]
        assert workers, producer.proc.tail(30)
        resume = threading.Timer(PRODUCER_STALL, lambda: [_signal(p, signal.SIGCONT) for p in workers])
        try:
            for p in workers:
                _signal(p, signal.SIGSTOP)
            resume.start()
            got.append(token_ids(ask(consumer, spec)))
        finally:
            resume.cancel()
            for p in workers:
                _signal(p, signal.SIGCONT)
        d = delta(consumer.counters(), before)
        tails = "\n".join(f"--- {s.name}\n{embresume_lines(s)}" for s in (producer, consumer))
        assert got == want, tails
        assert d.get("items_received", 0) == 3, (d, tails)
        assert d.get("local_encodes", 0) == 0 and d.get("recomputes", 0) == 0, (d, tails)
        assert d.get("transfer_failures", 0) == 0 and d.get("failovers", 0) == 0, (d, tails)
        # SIGTERM to each server (the API server process only, as a terminal's Ctrl-C or a
        # service manager would): each logs its connector totals on the way out
        for s in (consumer, producer):
            os.kill(s.proc.p.pid, signal.SIGTERM)
        for s in (consumer, producer):
            s.proc.wait(60)
        logs = {s.name: s.proc.log.read_text(errors="replace") for s in (producer, consumer)}
        missing = []
        if "embresume EC connector (consumer, scheduler) totals:" not in logs["docs-consumer"]:
            missing.append(f"docs-consumer: no 'embresume EC connector (consumer, scheduler) totals:'\n"
                           f"{consumer.proc.tail(30)}")
        if not re.search(r"embresume EC connector \(producer[^)]*\) totals:", logs["docs-producer"]):
            missing.append(f"docs-producer: no 'embresume EC connector (producer...) totals:'\n"
                           f"{producer.proc.tail(30)}")
        assert not missing, "\n".join(missing)
    finally:
        for s in servers:
            s.stop()
