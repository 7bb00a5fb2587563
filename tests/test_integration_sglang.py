"""The SGLang plugin (embresume.integrations.sglang) against SGLang's own classes.

Real SGLang objects: the plugin framework (``HookRegistry`` applies the two
class replacements as ``load_plugins()`` would), ``ZmqDelivery`` /
``EncoderDelivery`` and ``WaitingZmqRequest`` / ``WaitingMMRequestBase`` (the
adapters subclass them), ``MMEncoder._send`` and
``MMEncoder._wait_for_embedding`` (the encoder's real ZeroMQ control path and
embedding wait, bound to a stand-in encoder object), ``ReqState``,
``SendDestination``, ``EmbeddingData``, ``create_part_req_id``,
``TokenizedGenerateReqInput`` / ``SamplingParams``, and the receive side's
per-request PULL socket, part aggregation (``MultiModalEmbeddingData``) and
assembly (``_assemble_mm_inputs_from_embeddings``).

Stand-ins: ``MMEncoder`` itself (it loads a model) — an object carrying the
attributes ``_send`` uses; ``get_disagg()`` in the encoder module (SGLang
publishes it from ``ServerArgs``, which needs a model) returns
``encoder_transfer_backend="zmq_to_scheduler"``; the multimodal processor
(``get_validated_mm_data`` records the embeddings it is given); the HTTP
registration (``/scheduler_receive_url``) is replaced by handing the
receivers' ports to the encoder process directly, and the scheduler tick by
calling ``_try_recv_mm_data`` as ``_process_waiting_requests`` does (minus the
TP all-reduce).  When the installed torchvision cannot load (a CUDA wheel next
to a CPU torch) a stub is installed, because SGLang imports torchvision at
import time for model processors this test never runs.

Order of calls (SGLang 0.5.23): encoder — ``MMEncoder.send_with_url`` ->
``send_to_destination`` -> ``delivery.send(state, destination)`` for each
rank that registered, then ``release_request`` -> ``delivery.release``;
scheduler — ``_process_waiting_requests`` creates the waiting request,
``send_encode_request``, then every tick ``_try_recv_mm_data`` ->
``consume_parts`` -> (all parts) ``_assemble_mm_inputs_from_embeddings``;
``release_resources`` on abort / failure / timeout.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import types

import pytest
import torch

HIDDEN = 128
#: the encoder addresses a language rank may dial (the plugin's allow-list, from the environment)
ADDRESSES_ENV = "EMBRESUME_ENCODER_ADDRESSES"
DTYPE = torch.bfloat16
OPTIONS = {"block_size": 16, "default_allocate_tokens": 64, "pool_blocks": 256, "request_timeout": 20.0,
           "handshake_timeout": 3.0, "device": "cpu"}


def install_torchvision_stub() -> bool:
    """SGLang imports torchvision at import time (model processors); a CUDA
    torchvision wheel does not load next to a CPU torch.  Install an empty
    stand-in then (none of its code runs here).  Returns whether it did."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:
        pass
    import enum
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    class Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("torchvision stand-in: not usable")

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unavailable

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.transforms.v2", "torchvision.transforms.v2.functional", "torchvision.io",
                 "torchvision.ops", "torchvision.models", "torchvision.utils", "torchvision.datasets"):
        m = types.ModuleType(name)
        m.__path__ = []
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        m.__getattr__ = missing
        sys.modules[name] = m
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, m)
    sys.modules["torchvision"].__version__ = "0.0+stand-in"
    sys.modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    sys.modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    return True


try:
    import importlib.util
    if importlib.util.find_spec("sglang") is None:
        raise ModuleNotFoundError("No module named 'sglang'")
    install_torchvision_stub()
    import zmq
    from sglang.srt.disaggregation.encoder import receiver, server
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.schedule_batch import Modality
    from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor
    from sglang.srt.plugins import hook_registry
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.sampling.sampling_params import SamplingParams
except Exception as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"SGLang's encoder-disaggregation classes do not import here ({type(e).__name__}: {e}); "
                "install them with the lines in docs/integrations.md", allow_module_level=True)

from embresume.harness import free_port
from embresume.integrations import sglang as plugin

pytestmark = pytest.mark.timeout(300)


def embedding(key: str, tokens: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "little")
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# ------------------------------------------------------------------ plugin registration
@pytest.fixture
def applied_hooks(monkeypatch):
    """register() + HookRegistry.apply_hooks(), as load_plugins() does; undone afterwards."""
    monkeypatch.setenv(plugin.ENABLE_ENV, "1")
    originals = {(server, "ZmqDelivery"): server.ZmqDelivery,
                 (receiver, "WaitingZmqRequest"): receiver.WaitingZmqRequest,
                 (receiver, "WaitingZmqRequestGrpc"): receiver.WaitingZmqRequestGrpc}
    HookRegistry.reset()
    plugin.register()
    HookRegistry.apply_hooks()
    try:
        yield
    finally:
        for (mod, name), orig in originals.items():
            new = getattr(mod, name)
            setattr(mod, name, orig)
            if new is not orig:
                hook_registry._propagate_patch(new, orig, mod)
        HookRegistry.reset()


def test_plugin_replaces_the_real_classes(applied_hooks):
    assert server.ZmqDelivery._embresume and receiver.WaitingZmqRequest._embresume
    assert issubclass(server.ZmqDelivery, server.EncoderDelivery)
    assert server.ZmqDelivery.__mro__[1].__name__ == "ZmqDelivery"
    assert issubclass(receiver.WaitingZmqRequest, receiver.WaitingMMRequestBase)
    assert receiver.WaitingZmqRequest.__mro__[2].__name__ == "WaitingZmqRequest"
    # MMReceiverHTTP.process_waiting_requests and MMEncoder.__init__ look the names up at call time
    assert receiver.WaitingZmqRequestGrpc._embresume
    assert receiver.WaitingZmqRequestGrpc.__mro__[2].__name__ == "WaitingZmqRequestGrpc"
    assert "WaitingZmqRequest" in receiver.MMReceiverHTTP.process_waiting_requests.__code__.co_names
    assert "WaitingZmqRequestGrpc" in receiver.MMReceiverGrpc.process_waiting_requests.__code__.co_names
    assert "ZmqDelivery" in server.MMEncoder.__init__.__code__.co_names


def test_plugin_is_inert_unless_enabled(monkeypatch):
    monkeypatch.delenv(plugin.ENABLE_ENV, raising=False)
    HookRegistry.reset()
    plugin.register()
    assert not HookRegistry._hooks
    HookRegistry.reset()


# ------------------------------------------------------------------ encoder process
class EncoderStandIn:
    """What MMEncoder._send and _wait_for_embedding use of an MMEncoder (no model)."""

    _send = server.MMEncoder._send
    _wait_for_embedding = server.MMEncoder._wait_for_embedding

    def __init__(self):
        import concurrent.futures
        import zmq.asyncio
        self.transfer_backend = "zmq_to_scheduler"
        self.context = zmq.asyncio.Context()
        self.sync_context = zmq.Context()
        self.scheduler_send_sockets = {}
        self.scheduler_send_locks = {}
        self.send_timeout = 30
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)


def encoder_main(port: int, cmds, results) -> None:
    import asyncio
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ[plugin.ENABLE_ENV] = "1"
    os.environ[plugin.OPTIONS_ENV] = json.dumps(dict(OPTIONS, encoder_address=f"tcp://127.0.0.1:{port}"))
    server.get_disagg = lambda: types.SimpleNamespace(encoder_transfer_backend="zmq_to_scheduler")

    async def main():
        delivery = plugin.delivery_class()(EncoderStandIn(), cleanup_receive_state=True)
        results.put(("ready", None))
        while True:
            cmd = await asyncio.to_thread(cmds.get, True, 120)
            if cmd[0] == "stop":
                return
            _, rid, parts, urls = cmd
            outcome = []
            for part_idx, spec in enumerate(parts):
                # spec: rows, or (rows, placeholder tokens its grid gives, rows its metadata claims)
                tokens, grid_tokens, claimed = spec if isinstance(spec, (list, tuple)) else (spec, spec, spec)
                req_id = receiver.create_part_req_id(rid, part_idx)
                state = server.ReqState(req_id=req_id)
                state.embedding_data = receiver.EmbeddingData(
                    req_id, len(parts), part_idx, torch.tensor([[1, 2, grid_tokens * 2]]), Modality.IMAGE,
                    embedding=embedding(req_id, tokens))
                state.embedding_data.shape = [claimed, HIDDEN]
                state.embedding_ready.set()
                # MMEncoder.send_with_url: one send_to_destination per registered rank, then release
                res = await asyncio.gather(*(delivery.send(state, server.SendDestination.from_url(u))
                                             for u in urls), return_exceptions=True)
                await delivery.release(state)
                outcome.append([None if r is None else repr(r) for r in res])
            results.put(("sent", outcome))

    try:
        asyncio.run(main())
        plugin._close_encoder_endpoint()
        results.put(("stopped", None))
    except BaseException as e:  # pragma: no cover - reported to the parent
        import traceback
        results.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class Encoder:
    def __init__(self):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        ctx = mp.get_context("spawn")
        self.cmds, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=encoder_main, args=(self.port, self.cmds, self.results), daemon=True)
        self.proc.start()
        assert self.get(120)[0] == "ready"

    def get(self, timeout):
        try:
            kind, value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"encoder process silent for {timeout}s (alive={self.proc.is_alive()})") from None
        if kind == "error":
            raise AssertionError(f"encoder process failed: {value}")
        return kind, value

    def stop(self):
        if self.proc.is_alive():
            self.cmds.put(("stop",))
            try:
                self.get(30)
            except AssertionError:
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture(scope="module")
def encoder():
    e = Encoder()
    try:
        yield e
    finally:
        e.stop()


# ------------------------------------------------------------------ scheduler side
#: image start, placeholder (pad) and end token ids of the test prompts
IM_START, IM_PAD, IM_END = 900, 901, 902


class ProcessorStandIn(BaseMultimodalProcessor):
    """SGLang's own BaseMultimodalProcessor (its get_validated_mm_data,
    get_mm_data and build_input_ids: each image placeholder of the prompt
    becomes prod(grid) / merge_size**2 tokens) without a model: __init__
    loads none, the merge size is 2 and the embeddings it is given are
    recorded."""

    models = []
    prefer_tokenized_input = True
    IM_START_TOKEN_ID, IM_TOKEN_ID, IM_END_TOKEN_ID = IM_START, IM_PAD, IM_END

    def __init__(self):
        self.hf_config = types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2))
        self.embeddings = None

    async def process_mm_data_async(self, *args, **kwargs):  # pragma: no cover - not used in EPD assembly
        raise NotImplementedError

    def get_mm_data(self, prompt, embeddings, **kwargs):
        self.embeddings, self.kwargs = embeddings, kwargs
        return super().get_mm_data(prompt, embeddings, **kwargs)


def prompt(images: int) -> list:
    """A tokenized prompt with one image placeholder per part."""
    return [1, *([IM_START, IM_PAD, IM_END] * images), 2]


def expanded(parts) -> list:
    """The prompt once SGLang's processor expanded each placeholder to its part's tokens."""
    out = [1]
    for n in parts:
        out += [IM_START, *([IM_PAD] * n), IM_END]
    return out + [2]


def request(rid: str, images: int):
    return TokenizedGenerateReqInput(
        rid=rid, input_text=None, input_ids=prompt(images), input_embeds=None, mm_inputs=None,
        token_type_ids=None, sampling_params=SamplingParams(), return_logprob=False, logprob_start_len=-1,
        top_logprobs_num=0, token_ids_logprob=None, stream=False)


@pytest.fixture
def waiting(monkeypatch, encoder):
    made = []

    def make(rid, receive_count=1, tp_rank=0, images=1):
        cls = plugin.waiting_class()
        monkeypatch.setattr(plugin, "current_tp_rank", lambda: tp_rank)
        req = request(rid, images)
        proc = ProcessorStandIn()
        w = cls(rid=rid, recv_req=req, mm_processor=proc, encoder_urls=["http://127.0.0.1:1"],
                model_type="qwen2_vl", host_name="127.0.0.1", receive_count=receive_count,
                zmq_context=zmq.Context())
        made.append(w)
        return w, proc

    monkeypatch.setenv(plugin.OPTIONS_ENV, json.dumps(OPTIONS))
    monkeypatch.setenv(ADDRESSES_ENV, encoder.address)   # the encoders the schedulers may dial
    yield make
    for w in made:
        w.release_resources()
        w.close_recv_socket()
    plugin.close_language_endpoints()


def tick_until_done(reqs, timeout=60.0):
    """The scheduler's tick: _try_recv_mm_data on every waiting request (bounded)."""
    deadline = time.monotonic() + timeout
    pending = receiver.WaitingMMRequestStatus.PENDING
    while any(w.status == pending for w in reqs):
        assert time.monotonic() < deadline, "waiting requests never left PENDING"
        for w in reqs:
            w._try_recv_mm_data()
        time.sleep(0.005)
    return [w.status for w in reqs]


def expected(rid, parts):
    return torch.cat([embedding(receiver.create_part_req_id(rid, i), n) for i, n in enumerate(parts)])


def test_two_processes_bit_exact(encoder, waiting):
    """Two parts of one request (one under a block, one several default allocations)
    cross processes through embresume and are assembled bit for bit."""
    w, proc = waiting("req-1", images=2)
    parts = [5, 300]
    encoder.cmds.put(("send", "req-1", parts, [f"127.0.0.1:{w.embedding_port}"]))
    assert tick_until_done([w]) == [receiver.WaitingMMRequestStatus.SUCCESS], w.error_msg
    assert encoder.get(60) == ("sent", [[None], [None]])
    got = proc.embeddings[Modality.IMAGE]
    assert same_bits(got, expected("req-1", parts))
    assert w.recv_req.mm_inputs is not None and list(w.recv_req.input_ids) == expanded(parts)
    ep = plugin._lang_endpoints[0]
    assert ep.stats["hinted"] == 2 and ep.stats["resumes"] == 0
    assert [e["transport"] for e in ep.encoders()] == ["shm"]


def test_tensor_parallel_ranks_each_get_a_copy(encoder, waiting):
    w0, p0 = waiting("req-tp", receive_count=2, tp_rank=0, images=2)
    w1, p1 = waiting("req-tp", receive_count=2, tp_rank=1, images=2)
    parts = [70, 17]
    encoder.cmds.put(("send", "req-tp", parts, [f"127.0.0.1:{w0.embedding_port}",
                                                 f"127.0.0.1:{w1.embedding_port}"]))
    ok = receiver.WaitingMMRequestStatus.SUCCESS
    assert tick_until_done([w0, w1]) == [ok, ok], (w0.error_msg, w1.error_msg)
    assert encoder.get(60) == ("sent", [[None, None], [None, None]])
    for p in (p0, p1):
        assert same_bits(p.embeddings[Modality.IMAGE], expected("req-tp", parts))
    assert p0.embeddings[Modality.IMAGE].data_ptr() != p1.embeddings[Modality.IMAGE].data_ptr()


def marked_part(rid: str, tokens: int, encoder_address: str, width: int = HIDDEN, dtype=DTYPE):
    """The metadata part a plugin encoder sends: its room and its encoder address."""
    part = receiver.EmbeddingData(receiver.create_part_req_id(rid, 0), 1, 0, torch.tensor([[1, 2, tokens * 2]]),
                                  Modality.IMAGE, embedding_shape=[tokens, width])
    part.dtype = dtype
    setattr(part, plugin.ROOM_ATTR, part.req_id)
    setattr(part, plugin.ENCODER_ATTR, encoder_address)
    return part


def push(port: int, obj, payload: bytes = b"\0\0"):
    """Put one part on a receiver's socket as the encoder's _send does."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send_multipart([pickle.dumps(obj), payload])
    s.close(linger=2000)


def test_failed_transfer_fails_the_request_not_the_scheduler(waiting, monkeypatch):
    """A part naming an (allowed) encoder nobody runs: SGLang's FAIL status with the reason."""
    w, _ = waiting("req-dead")
    dead = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv(ADDRESSES_ENV, dead)
    push(w.embedding_port, marked_part("req-dead", 4, dead))
    assert tick_until_done([w]) == [receiver.WaitingMMRequestStatus.FAIL]
    assert "embresume" in w.error_msg


def test_unmarked_parts_still_take_the_zeromq_path(waiting):
    """Parts from an encoder without the plugin (or an error payload) are SGLang's own."""
    w, proc = waiting("req-plain")
    emb = embedding("plain", 9)
    part = receiver.EmbeddingData(receiver.create_part_req_id("req-plain", 0), 1, 0, torch.tensor([[1, 2, 18]]),
                                  Modality.IMAGE, embedding=emb).copy_without_embedding()
    push(w.embedding_port, part, emb.contiguous().view(torch.uint8).numpy().tobytes())
    assert tick_until_done([w]) == [receiver.WaitingMMRequestStatus.SUCCESS]
    assert same_bits(proc.embeddings[Modality.IMAGE], emb)


# ------------------------------------------------------------------ untrusted parts
FAIL, OK = receiver.WaitingMMRequestStatus.FAIL, receiver.WaitingMMRequestStatus.SUCCESS


def url(w) -> str:
    return f"127.0.0.1:{w.embedding_port}"


def eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pool_is_full() -> bool:
    """Every block of every language endpoint of this process is free again."""
    return all(ep.allocator.used_blocks == 0 for ep in list(plugin._lang_endpoints.values()))


class Listener:
    """A TCP port that records whether anything connected to it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"

    def connections(self, settle: float = 0.5) -> int:
        time.sleep(settle)
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    def close(self):
        self.sock.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.mark.parametrize("delta", [-1, 1], ids=["one-row-short", "one-row-long"])
def test_an_embedding_that_does_not_fit_the_placeholders_fails_that_request_alone(encoder, waiting, delta):
    """The encoder sends 8 + delta rows (its metadata says so too) for an image
    whose grid gives the request 8 placeholder tokens: that request fails with
    the reason before SGLang's model could see it; the other request, in
    flight at the same time, gets its embedding bit for bit; every pool block
    is free again."""
    bad, _ = waiting(f"req-rows{delta:+d}")
    good, proc = waiting(f"req-fits{delta:+d}")
    encoder.cmds.put(("send", bad.rid, [(8 + delta, 8, 8 + delta)], [url(bad)]))
    encoder.cmds.put(("send", good.rid, [8], [url(good)]))
    assert tick_until_done([bad, good]) == [FAIL, OK], (bad.error_msg, good.error_msg)
    print(f"\nrefused: {bad.error_msg}")
    assert "placeholder" in bad.error_msg and str(8 + delta) in bad.error_msg, bad.error_msg
    assert bad.recv_req.mm_inputs is None
    assert same_bits(proc.embeddings[Modality.IMAGE], expected(good.rid, [8]))
    assert list(good.recv_req.input_ids) == expanded([8])
    assert [encoder.get(60), encoder.get(60)] == [("sent", [[None]])] * 2
    assert eventually(pool_is_full), {r: ep.allocator.used_blocks for r, ep in plugin._lang_endpoints.items()}


@pytest.mark.parametrize("delta,zero_copy", [(-1, False), (1, False), (-1, True)],
                         ids=["one-row-short", "one-row-long", "one-row-short-zero-copy"])
def test_an_embedding_that_is_not_what_its_metadata_says_fails_that_request_alone(encoder, waiting, monkeypatch,
                                                                                  delta, zero_copy):
    """The part's metadata says 8 rows (and the grid 8 placeholders), the
    embresume transfer brings 8 + delta: that request fails, the other one
    does not, no block is held (with zero_copy results too, which lend
    their pool blocks until released)."""
    monkeypatch.setenv(plugin.OPTIONS_ENV, json.dumps(dict(OPTIONS, zero_copy=zero_copy)))
    bad, _ = waiting(f"req-claims{delta:+d}{'-zc' if zero_copy else ''}")
    good, proc = waiting(f"req-honest{delta:+d}{'-zc' if zero_copy else ''}")
    encoder.cmds.put(("send", bad.rid, [(8 + delta, 8, 8)], [url(bad)]))
    encoder.cmds.put(("send", good.rid, [8], [url(good)]))
    assert tick_until_done([bad, good]) == [FAIL, OK], (bad.error_msg, good.error_msg)
    print(f"\nrefused: {bad.error_msg}")
    assert "embresume" in bad.error_msg and f"({8 + delta}, {HIDDEN})" in bad.error_msg, bad.error_msg
    assert same_bits(proc.embeddings[Modality.IMAGE], expected(good.rid, [8]))
    assert plugin._lang_endpoints[0].config.zero_copy is zero_copy
    assert [encoder.get(60), encoder.get(60)] == [("sent", [[None]])] * 2
    assert eventually(pool_is_full), {r: ep.allocator.used_blocks for r, ep in plugin._lang_endpoints.items()}


@pytest.fixture
def dialled(monkeypatch):
    """The addresses LanguageEndpoint starts a connection to (its one connect path)."""
    from embresume.language import LanguageEndpoint
    seen = []
    start = LanguageEndpoint._start_connecting

    def spy(self, enc):
        seen.append(enc.address)
        return start(self, enc)

    monkeypatch.setattr(LanguageEndpoint, "_start_connecting", spy)
    return seen


def test_an_encoder_address_outside_the_allow_list_is_never_dialled(encoder, waiting, listener, dialled):
    """A part (pushed by anyone who reaches the scheduler's receive port) naming
    an address that is not in the configured encoder addresses: no connection
    to it, that request fails with the reason, the other request goes on."""
    bad, _ = waiting("req-rogue")
    good, proc = waiting("req-allowed")
    push(bad.embedding_port, marked_part("req-rogue", 4, listener.address))
    encoder.cmds.put(("send", good.rid, [4], [url(good)]))
    assert tick_until_done([bad, good]) == [FAIL, OK], (bad.error_msg, good.error_msg)
    assert listener.connections() == 0
    assert set(dialled) == {encoder.address}, dialled
    print(f"\nrefused: {bad.error_msg}")
    assert listener.address in bad.error_msg and "encoder_addresses" in bad.error_msg, bad.error_msg
    assert all(e["address"] != listener.address for ep in plugin._lang_endpoints.values() for e in ep.encoders())
    assert same_bits(proc.embeddings[Modality.IMAGE], expected(good.rid, [4]))
    assert encoder.get(60) == ("sent", [[None]])
    assert eventually(pool_is_full)


def test_the_allow_list_comes_from_the_options_too(encoder, waiting, listener, dialled, monkeypatch):
    """encoder_addresses in EMBRESUME_SGLANG_OPTIONS (a list): the same refusal."""
    monkeypatch.delenv(ADDRESSES_ENV)
    monkeypatch.setenv(plugin.OPTIONS_ENV, json.dumps(dict(OPTIONS, encoder_addresses=[encoder.address])))
    bad, _ = waiting("req-rogue-opts")
    good, proc = waiting("req-allowed-opts")
    push(bad.embedding_port, marked_part("req-rogue-opts", 4, listener.address))
    encoder.cmds.put(("send", good.rid, [4], [url(good)]))
    assert tick_until_done([bad, good]) == [FAIL, OK], (bad.error_msg, good.error_msg)
    assert listener.connections() == 0 and set(dialled) == {encoder.address}, dialled
    assert listener.address in bad.error_msg, bad.error_msg
    assert same_bits(proc.embeddings[Modality.IMAGE], expected(good.rid, [4]))
    assert encoder.get(60) == ("sent", [[None]])


@pytest.mark.parametrize("field", ["tokens", "width", "dtype", "room"])
def test_part_values_outside_the_configured_bounds_fail_that_request_alone(encoder, waiting, listener, dialled,
                                                                           monkeypatch, field):
    """A part from an allowed address whose token count, width or dtype is out
    of bounds, or whose room is another request's: refused before any
    connection or allocation (so it cannot size this rank's pool either); the
    next request, from the real encoder, is received."""
    bad, _ = waiting(f"req-bounds-{field}")
    good, proc = waiting(f"req-in-bounds-{field}")
    monkeypatch.setenv(ADDRESSES_ENV, f"{encoder.address},{listener.address}")
    monkeypatch.setenv(plugin.OPTIONS_ENV, json.dumps(dict(OPTIONS, pool_blocks=8)))
    part = marked_part(bad.rid, 4, listener.address)
    if field == "tokens":
        part.shape = [(1 << 20) + 1, HIDDEN]          # past the default max_part_tokens
    elif field == "width":
        part.shape = [4, (1 << 16) + 1]               # past the default max_hidden_size
    elif field == "dtype":
        part.dtype = torch.int32
    else:
        setattr(part, plugin.ROOM_ATTR, receiver.create_part_req_id(good.rid, 0))
    push(bad.embedding_port, part)
    assert tick_until_done([bad]) == [FAIL]
    assert listener.connections() == 0 and dialled == []
    print(f"\nrefused: {bad.error_msg}")
    assert "embresume part refused" in bad.error_msg, bad.error_msg
    encoder.cmds.put(("send", good.rid, [4], [url(good)]))
    assert tick_until_done([good]) == [OK], good.error_msg
    assert same_bits(proc.embeddings[Modality.IMAGE], expected(good.rid, [4]))
    assert encoder.get(60) == ("sent", [[None]])
    assert plugin._lang_endpoints[0].config.hidden_size == HIDDEN
    assert eventually(pool_is_full)


# ------------------------------------------------------------------ TP group of an instance
def test_tp_group_override_from_the_environment_and_the_options(waiting, monkeypatch):
    """extra['tp_group'] in the options, or EMBRESUME_TP_GROUP, names the group instead."""
    monkeypatch.setenv(plugin.GROUP_ENV, "group-from-env")
    assert plugin.language_endpoint(0, HIDDEN, DTYPE).tp_group == "group-from-env"
    plugin.close_language_endpoints()
    monkeypatch.setenv(plugin.OPTIONS_ENV, json.dumps(dict(OPTIONS, extra={"tp_group": "group-from-options"})))
    assert plugin.language_endpoint(0, HIDDEN, DTYPE).tp_group == "group-from-options"
    plugin.close_language_endpoints()


def rank_main(dist_port: int, world: int, rank: int, rid: str, encoder_address: str, results) -> None:
    """One scheduler rank of one SGLang instance: its own process in the
    instance's torch.distributed WORLD (gloo, as SGLang's scheduler initializes
    it before receiving), receiving ``rid`` through the plugin's real
    WaitingZmqRequest subclass."""
    import datetime
    import signal
    import torch.distributed as dist
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        os.environ[plugin.OPTIONS_ENV] = json.dumps(OPTIONS)
        os.environ[ADDRESSES_ENV] = encoder_address
        os.environ.pop(plugin.GROUP_ENV, None)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{dist_port}", world_size=world, rank=rank,
                                timeout=datetime.timedelta(seconds=90))
        plugin.current_tp_rank = lambda: rank      # SGLang's runtime context is not published here
        req = request(rid, 2)
        proc = ProcessorStandIn()
        w = plugin.waiting_class()(rid=rid, recv_req=req, mm_processor=proc, encoder_urls=["http://127.0.0.1:1"],
                                   model_type="qwen2_vl", host_name="127.0.0.1", receive_count=world,
                                   zmq_context=zmq.Context())
        results.put(("port", (rid, rank, w.embedding_port)))
        status = tick_until_done([w], timeout=120)
        got = proc.embeddings[Modality.IMAGE] if proc.embeddings else None
        ep = plugin._lang_endpoints[rank]
        results.put(("done", (rid, rank, int(status[0]), w.error_msg,
                              got is not None and same_bits(got, expected(rid, [40, 9])),
                              ep.tp_group, plugin.instance_group())))
        w.release_resources()
        w.close_recv_socket()
        plugin.close_language_endpoints()
        dist.destroy_process_group()
    except BaseException as e:  # pragma: no cover - reported to the parent
        import traceback
        results.put(("error", f"rank {rank} of {rid}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def test_tp_group_is_shared_by_the_ranks_of_an_instance_and_differs_between_instances(encoder):
    """Two instances of two scheduler ranks each (four processes, one gloo WORLD
    per instance): every rank's endpoint carries its instance's group, the same
    on both ranks and not the other instance's; both instances receive their
    request through the encoder (which keeps a room to one group's ranks)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    rids = ["req-inst-a", "req-inst-b"]
    procs = [ctx.Process(target=rank_main, args=(port, 2, rank, rid, encoder.address, results), daemon=True)
             for rid, port in zip(rids, (free_port(), free_port())) for rank in (0, 1)]
    for p in procs:
        p.start()

    def get(kind, n, timeout):
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            try:
                k, v = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"rank processes silent ({[p.exitcode for p in procs]})") from None
            assert k != "error", v
            assert k == kind, (k, v)
            out.append(v)
        return out

    try:
        ports: dict = {}
        for rid, rank, port in get("port", 4, 240):
            ports.setdefault(rid, {})[rank] = port
        for rid in rids:
            encoder.cmds.put(("send", rid, [40, 9], [f"127.0.0.1:{ports[rid][r]}" for r in (0, 1)]))
        done = {(rid, rank): rest for rid, rank, *rest in get("done", 4, 180)}
        for rid in rids:
            assert encoder.get(60) == ("sent", [[None, None], [None, None]])
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    ok = int(receiver.WaitingMMRequestStatus.SUCCESS)
    for key, (status, error, bits, group, instance) in done.items():
        assert status == ok and bits, (key, error)
        assert group == instance and group.startswith("sglang-") and len(group) > 20, (key, group)
    a, b = (done[(rids[0], 0)][3], done[(rids[1], 0)][3])
    assert done[(rids[0], 1)][3] == a and done[(rids[1], 1)][3] == b
    assert a != b
