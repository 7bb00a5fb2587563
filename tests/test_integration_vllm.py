"""The vLLM EC connector (embresume.integrations.vllm) against vLLM's own classes.

Real vLLM objects: ``ECConnectorBase`` (the adapter subclasses it),
``ECConnectorFactory`` (loads the adapter from ``ec_connector_module_path``,
both roles), ``ensure_ec_transfer_initialized`` (the worker's global
connector), ``VllmConfig`` / ``ECTransferConfig`` / ``ParallelConfig``,
``Request`` with ``MultiModalFeatureSpec`` / ``PlaceholderRange`` /
``SamplingParams`` (``ec_transfer_params`` through ``extra_args`` as the
serving layer passes it), ``SchedulerOutput``, the V2 model runner's
``ActiveECConnector`` (which makes the worker-side calls: bind metadata,
start_save_caches / start_load_caches, save_caches for new encoder outputs,
get_finished, get_ec_connector_stats, build_connector_worker_meta, clear),
``ModelRunnerOutput`` and ``ECOutputAggregator`` (merges the TP ranks'
outputs as the executor does).

Stand-ins: the scheduler loop itself (``Scheduler`` needs a KV-cache config
and a model), replaced by :func:`schedule` / :func:`finish_step`, which make
the connector calls in the order of vllm/v1/core/sched/scheduler.py (0.33.0):
``ensure_cache_available`` (schedule(), line 1247/1271/829) ->
``has_cache_item`` (_try_schedule_encoder_inputs, line 2190) ->
``update_state_after_alloc`` (_allocate_encoder_inputs, line 2013) ->
``build_connector_meta`` (end of schedule(), line 1769); after the model step
``take_unavailable_requests`` (update_from_output, line 2562) ->
``update_connector_output`` (line 2586); ``request_finished`` when a request
ends (_free_request, line 3048).  The "vision tower" writes a deterministic
tensor into ``encoder_cache`` and the "gather" reads it back, as the model
runner's _execute_mm_encoder / _gather_mm_embeddings do; the media payload of
a feature is an empty ``MultiModalKwargsItem``.

The producer is a real second process (spawn); every wait is bounded and the
child is killed when a test fails.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import queue
import time

import pytest
import torch

try:
    from vllm.config import DeviceConfig, ECTransferConfig, ParallelConfig, VllmConfig
    from vllm.distributed.ec_transfer import ec_transfer_state
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorRole
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
    from vllm.distributed.ec_transfer.ec_connector.utils import ECOutputAggregator
    from vllm.multimodal.inputs import (MultiModalFeatureSpec, MultiModalFieldElem, MultiModalKwargsItem,
                                        MultiModalSharedField, PlaceholderRange)
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu.ec_connector import ActiveECConnector
except Exception as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"vLLM's EC connector interface does not import here ({type(e).__name__}: {e}); "
                "install it with the lines in docs/integrations.md", allow_module_level=True)

from embresume.harness import free_port
from embresume.status import Status
from embresume.integrations import vllm as adapter
from embresume.integrations.vllm import EmbresumeECConnector, EmbresumeECWorkerMetadata

pytestmark = pytest.mark.timeout(300)

HIDDEN = 256
DTYPE = torch.bfloat16
CONNECTOR = "EmbresumeECConnector"
MODULE = "embresume.integrations.vllm"
BASE_EXTRA = {"hidden_size": HIDDEN, "dtype": "bf16", "device": "cpu", "block_size": 16,
              "default_allocate_tokens": 64, "pool_blocks": 256, "request_timeout": 20.0,
              "handshake_timeout": 5.0}


# ------------------------------------------------------------------ helpers
def vllm_config(role: str, extra: dict, tp: int = 1) -> "VllmConfig":
    """A real VllmConfig (no model).  VllmConfig.__post_init__ refuses an
    ``ec_producer`` without a multimodal ModelConfig, and building one inspects
    the model class (it imports the model's code), so the producer's
    ECTransferConfig is attached after construction; the connector only reads it."""
    ec = ECTransferConfig(ec_connector=CONNECTOR, ec_connector_module_path=MODULE, ec_role=role,
                          ec_connector_extra_config=dict(extra))
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"),
                     parallel_config=ParallelConfig(tensor_parallel_size=tp),
                     ec_transfer_config=None if ec.is_encode_only else ec)
    cfg.ec_transfer_config = ec
    return cfg


def embedding(mm_hash: str, tokens: int) -> torch.Tensor:
    """The 'vision tower': a deterministic [tokens, HIDDEN] bf16 tensor per item."""
    seed = int.from_bytes(hashlib.blake2b(mm_hash.encode(), digest_size=6).digest(), "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, HIDDEN, generator=g).to(DTYPE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def media_item(media):
    """True: the item carries pixels (recomputable); "meta": placeholder metadata only (what
    vLLM 0.33 gives EC consumers), False: no data at all."""
    if media is True:
        return MultiModalKwargsItem.dummy()
    if media == "meta":
        return MultiModalKwargsItem({"pixel_values": MultiModalFieldElem(
            data=None, field=MultiModalSharedField(batch_size=1))})
    return None


def make_request(rid: str, items, params=None, media=True) -> "Request":
    """items: [(mm_hash, num_embeds)]; placeholders laid out one after another after one text token."""
    feats, pos = [], 1
    for h, n in items:
        feats.append(MultiModalFeatureSpec(data=media_item(media), modality="image",
                                           identifier=h, mm_position=PlaceholderRange(offset=pos, length=n)))
        pos += n
    extra_args = {"ec_transfer_params": params} if params is not None else None
    return Request(rid, [0] * (pos + 1), SamplingParams(max_tokens=1, extra_args=extra_args), None,
                   mm_features=feats)


def schedule(sched, requests, freed=()):
    """One Scheduler.schedule() worth of connector calls; returns (SchedulerOutput, scheduled).

    scheduled: [(request, external_load_indices, local_encode_indices)]."""
    scheduled = []
    for req in requests:                    # Scheduler._free_encoder_inputs
        for i, f in enumerate(req.mm_features):
            if f.identifier in freed:
                sched.update_state_after_free(req, i)
    for req in requests:
        if not sched.ensure_cache_available(req, req.num_computed_tokens):
            continue
        ext, local = [], []
        for i, f in enumerate(req.mm_features):
            (ext if sched.has_cache_item(f.identifier) else local).append(i)
        for i in local + ext:
            sched.update_state_after_alloc(req, i)
        scheduled.append((req, ext, local))
    so = SchedulerOutput.make_empty()
    so.free_encoder_mm_hashes = list(freed)
    so.ec_connector_metadata = sched.build_connector_meta(so)
    return so, scheduled


def active_for(worker, encoder_cache: dict) -> "ActiveECConnector":
    """The V2 runner's ActiveECConnector bound to ``worker`` (it reads the process-global agent)."""
    saved = ec_transfer_state._EC_CONNECTOR_AGENT
    ec_transfer_state._EC_CONNECTOR_AGENT = worker
    try:
        return ActiveECConnector(None, encoder_cache)
    finally:
        ec_transfer_state._EC_CONNECTOR_AGENT = saved


def run_workers(ranks, so, scheduled, encode=embedding):
    """Every rank runs the step (ActiveECConnector.maybe_get_output around the model);
    returns the aggregated ModelRunnerOutput (ECOutputAggregator, as the executor)."""
    outs = []
    for worker, cache in ranks:
        with active_for(worker, cache).maybe_get_output(so) as ec_out:
            for req, ext, local in scheduled:
                for i in local:                                   # _execute_mm_encoder
                    f = req.mm_features[i]
                    cache[f.identifier] = encode(f.identifier, f.mm_position.length)
                for i in ext + local:                             # _gather_mm_embeddings
                    assert req.mm_features[i].identifier in cache, "encoder cache miss"
        outs.append(ModelRunnerOutput.with_ec_conn_output(EMPTY_MODEL_RUNNER_OUTPUT, ec_out))
    return ECOutputAggregator().aggregate(outs, 0)


def finish_step(sched, output) -> set:
    """Scheduler.update_from_output's connector calls; returns the requests it fails."""
    failed = sched.take_unavailable_requests()
    if output is not None and output.ec_connector_output is not None:
        sched.update_connector_output(output.ec_connector_output)
    return failed


def step_until(sched, ranks, requests, deadline_s=60.0, freed=()):
    """Step until every request was scheduled or failed; returns ({rid: (ext, local)}, failed rids)."""
    done, failed = {}, set()
    pending = list(requests)
    deadline = time.monotonic() + deadline_s
    while pending:
        assert time.monotonic() < deadline, f"requests never scheduled: {[r.request_id for r in pending]}"
        so, scheduled = schedule(sched, pending, freed)
        freed = ()
        out = run_workers(ranks, so, scheduled)
        failed |= finish_step(sched, out)
        for req, ext, local in scheduled:
            done[req.request_id] = ([req.mm_features[i].identifier for i in ext],
                                    [req.mm_features[i].identifier for i in local])
        for req in list(pending):
            if req.request_id in done or req.request_id in failed:
                pending.remove(req)
                sched.request_finished(req)
        time.sleep(0.01)
    return done, failed


# ------------------------------------------------------------------ producer process
def producer_main(port: int, cmds, results, more: Optional[dict] = None) -> None:
    """The encoder instance: scheduler- and worker-role connectors, driven like vLLM's engine."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        extra = dict(BASE_EXTRA, encoder_address=f"tcp://127.0.0.1:{port}", **(more or {}))
        cfg = vllm_config("ec_producer", extra)
        ec_transfer_state.ensure_ec_transfer_initialized(cfg)       # the worker's connector (factory)
        assert isinstance(ec_transfer_state.get_ec_transfer(), EmbresumeECConnector)
        sched = ECConnectorFactory.create_connector(cfg, ECConnectorRole.SCHEDULER)
        cache: dict = {}
        results.put(("ready", None))
        while True:
            cmd = cmds.get(timeout=120)
            if cmd[0] == "stop":
                break
            _, rid, items = cmd
            req = make_request(rid, items)
            so, scheduled = schedule(sched, [req])
            with ActiveECConnector(cfg, cache).maybe_get_output(so):
                for r, ext, local in scheduled:
                    for i in local:
                        f = r.mm_features[i]
                        if f.identifier not in cache:               # cached items are not re-encoded
                            cache[f.identifier] = embedding(f.identifier, f.mm_position.length)
            _, params = sched.request_finished(req)
            results.put(("params", params))
        ec_transfer_state.ensure_ec_transfer_shutdown()
        sched.shutdown()
        results.put(("stopped", None))
    except BaseException as e:  # pragma: no cover - reported to the parent
        import traceback
        results.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


#: the producers this module started: a consumer allows them in ec_transfer_params
#: (``allowed_encoders``; params naming any other encoder are refused)
PRODUCERS: list[str] = []


class Producer:
    def __init__(self, extra: Optional[dict] = None):
        self.port = free_port()
        PRODUCERS.append(self.address)
        ctx = mp.get_context("spawn")
        self.cmds, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=producer_main, args=(self.port, self.cmds, self.results, extra), daemon=True)
        self.proc.start()
        assert self._get(120)[0] == "ready"

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _get(self, timeout):
        try:
            kind, value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"producer silent for {timeout}s (alive={self.proc.is_alive()})") from None
        if kind == "error":
            raise AssertionError(f"producer failed: {value}")
        return kind, value

    def encode(self, rid, items) -> dict:
        self.cmds.put(("encode", rid, items))
        kind, params = self._get(60)
        assert kind == "params"
        return params

    def stop(self):
        if self.proc.is_alive():
            self.cmds.put(("stop",))
            try:
                self._get(30)
            except AssertionError:
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture(scope="module")
def producer():
    """One encoder-instance process for the module (each test uses its own items)."""
    p = Producer()
    try:
        yield p
    finally:
        p.stop()


RECEIVE_MODES = ["scheduler", "worker"]


@pytest.fixture(params=RECEIVE_MODES)
def receive(request):
    """receive="scheduler" (default: the scheduler process receives, workers load from the
    landing region) and receive="worker" (every worker receives its own copy)."""
    return request.param


def receiving_endpoint(sched, ranks):
    """The LanguageEndpoint that received (scheduler mode: the engine's one)."""
    return sched._lang if sched._lang is not None else ranks[0][0]._lang


@pytest.fixture
def consumer_parts(request, receive):
    made = []

    def make(extra, tp=1):
        cfg = vllm_config("ec_consumer", {**BASE_EXTRA, "receive": receive, "landing_bytes": "4MiB",
                                          "allowed_encoders": list(PRODUCERS), **extra}, tp=tp)
        sched = ECConnectorFactory.create_connector(cfg, ECConnectorRole.SCHEDULER)
        ranks = []
        for rank in range(tp):
            orig = adapter._placement
            adapter._placement = lambda rank=rank: (rank, tp, True)
            try:
                worker = ECConnectorFactory.create_connector(cfg, ECConnectorRole.WORKER)
            finally:
                adapter._placement = orig
            ranks.append((worker, {}))
        made.append((sched, ranks))
        return sched, ranks

    yield make
    for sched, ranks in made:
        for worker, _ in ranks:
            worker.shutdown()
        sched.shutdown()


# ------------------------------------------------------------------ tests
def test_is_a_real_vllm_ec_connector():
    assert issubclass(EmbresumeECConnector, ECConnectorBase)
    assert issubclass(EmbresumeECWorkerMetadata, adapter.ECConnectorWorkerMetadata)
    for role in ("ec_producer", "ec_consumer"):
        cfg = vllm_config(role, BASE_EXTRA)
        assert ECConnectorFactory.get_connector_class(cfg.ec_transfer_config) is EmbresumeECConnector
        sched = ECConnectorFactory.create_connector(cfg, ECConnectorRole.SCHEDULER)   # abstract methods all there
        assert isinstance(sched, EmbresumeECConnector) and sched.role is ECConnectorRole.SCHEDULER
        sched.shutdown()


def test_bad_options_fail_at_startup():
    for bad, match in ((dict(pool_blokcs=3), "unknown embresume"), (dict(on_failure="retry"), "on_failure"),
                       (dict(receive="both"), "receive"), (dict(failover_timeout=0), "failover_timeout"),
                       (dict(landing_bytes="-1M"), "size")):
        with pytest.raises(ValueError, match=match):
            ECConnectorFactory.create_connector(vllm_config("ec_consumer", dict(BASE_EXTRA, **bad)),
                                                ECConnectorRole.SCHEDULER)


def test_two_processes_bit_exact(producer, consumer_parts, receive):
    """Producer process encodes; the consumer's scheduler defers the request while the item
    comes, the item becomes a cache hit and lands in encoder_cache bit for bit.  Sizes
    cover under one block, exactly the default allocation, several default allocations."""
    items = [("img-a", 7), ("img-b", 64), ("img-c", 300)]
    params = producer.encode("enc-1", items)
    assert {h: params[h][adapter.PARAM_KEY] for h, _ in items} == {h: producer.address for h, _ in items}
    assert all(params[h]["num_embeds"] == n and params[h]["width"] == HIDDEN and params[h]["dtype"] == "bfloat16"
               for h, n in items)

    sched, ranks = consumer_parts({})
    req = make_request("lm-1", items, params=params)
    # first step: the request is deferred while the transfers start
    so, scheduled = schedule(sched, [req])
    assert scheduled == []
    if receive == "worker":
        assert {s.mm_hash for s in so.ec_connector_metadata.loads} == {h for h, _ in items}
    else:
        assert set(sched._items) == {h for h, _ in items}      # started by the scheduler itself
    assert sched.has_pending_push_work()
    finish_step(sched, run_workers(ranks, so, scheduled))

    done, failed = step_until(sched, ranks, [req])
    assert not failed
    ext, local = done["lm-1"]
    assert sorted(ext) == sorted(h for h, _ in items) and local == []
    cache = ranks[0][1]
    for h, n in items:
        assert same_bits(cache[h], embedding(h, n)), h
    # one more step: the workers' load reports unpin the landed items
    finish_step(sched, run_workers(ranks, *schedule(sched, [])))
    assert not sched.has_pending_push_work()
    lang = receiving_endpoint(sched, ranks)
    # every item was asked for with its exact size: no resume was needed
    assert lang.stats["requests"] == 3 and lang.stats["hinted"] == 3 and lang.stats["resumes"] == 0
    assert [e["transport"] for e in lang.encoders()] == ["shm"]
    st = (sched if receive == "scheduler" else ranks[0][0]).stats    # counted where it arrived
    assert st["items_received"] == 3 and st["bytes_received"] == sum(n for _, n in items) * HIDDEN * 2
    assert sched.stats["local_encodes"] == 0 and sched.stats["recomputes"] == 0
    if receive == "scheduler":
        # one-chunk items go from the pool straight into the landing region (zero-copy
        # results, no merged copy in between), and the pool is whole again afterwards
        assert lang.config.zero_copy and lang.allocator.free_blocks == lang.layout.num_blocks


def test_load_from_pool_workers_read_the_receive_pool(producer, consumer_parts, receive):
    """load_from_pool: one-chunk items are not copied into the landing region; both ranks read
    them from the scheduler's receive pool bit for bit, and once loaded (and no request waits
    for them) their blocks go back to the pool."""
    if receive == "worker":
        pytest.skip("receive='worker' has no landing region")
    items = [("pool-a", 7), ("pool-b", 300)]
    params = producer.encode("enc-pool", items)
    sched, ranks = consumer_parts({"load_from_pool": True}, tp=2)
    req = make_request("lm-pool", items, params=params)
    done, failed = step_until(sched, ranks, [req])
    assert not failed and sorted(done["lm-pool"][0]) == sorted(h for h, _ in items)
    for _, cache in ranks:
        for h, n in items:
            assert same_bits(cache[h], embedding(h, n)), h
    assert sched._region.used == 0                       # nothing went through the region
    assert sched.stats["items_held_in_pool"] == 2 and sched.stats["items_received"] == 2
    # the next step's load reports let the items go: the pool is whole again
    finish_step(sched, run_workers(ranks, *schedule(sched, [])))
    schedule(sched, [])
    lang = receiving_endpoint(sched, ranks)
    assert not sched._in_pool and not sched._items
    assert lang.allocator.free_blocks == lang.layout.num_blocks
    assert not sched.has_pending_push_work()


def test_load_from_pool_holds_the_blocks_until_every_rank_reported(producer, consumer_parts, receive):
    """TP 2: after the first rank's load report the item is still held in the pool (the other
    rank may be reading it); the second report lets it go."""
    if receive == "worker":
        pytest.skip("receive='worker' has no landing region")
    params = producer.encode("enc-tp-pool", [("tp-pool", 40)])
    sched, ranks = consumer_parts({}, tp=2)
    req = make_request("lm-tp-pool", [("tp-pool", 40)], params=params)
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline
        so, scheduled = schedule(sched, [req])
        if scheduled:
            break
        finish_step(sched, run_workers(ranks, so, scheduled))
        time.sleep(0.01)
    assert "tp-pool" in sched._in_pool and sched._region.used == 0
    sched.request_finished(req)
    finish_step(sched, run_workers(ranks[:1], so, scheduled))      # rank 0 reports
    assert "tp-pool" in sched._in_pool and sched._in_pool["tp-pool"].pins == 1
    finish_step(sched, run_workers(ranks[1:], so, scheduled))      # rank 1 reports
    lang = receiving_endpoint(sched, ranks)
    assert not sched._in_pool and lang.allocator.free_blocks == lang.layout.num_blocks
    for _, cache in ranks:
        assert same_bits(cache["tp-pool"], embedding("tp-pool", 40))


def test_load_from_pool_items_move_into_the_region_when_the_pool_runs_short(producer, consumer_parts, receive,
                                                                           monkeypatch):
    """An item held in the pool for a request vLLM does not schedule yet moves into the landing
    region once the pool runs short of free blocks (here: always), and loads from there."""
    if receive == "worker":
        pytest.skip("receive='worker' has no landing region")
    from embresume.integrations import _vllm_consumer
    items = [("spill-a", 100)]
    params = producer.encode("enc-spill", items)
    sched, ranks = consumer_parts({"load_from_pool": True})
    impl = getattr(sched, "_impl", sched)
    req = make_request("lm-spill", items, params=params)
    deadline = time.monotonic() + 30
    while not sched.ensure_cache_available(req, 0):      # landed (held in the pool) ...
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert "spill-a" in impl._in_pool and impl._region.used == 0
    monkeypatch.setattr(_vllm_consumer, "POOL_SPILL_FREE", 2.0)
    so = SchedulerOutput.make_empty()
    so.ec_connector_metadata = sched.build_connector_meta(so)   # ... but not scheduled this step
    assert not impl._in_pool and "spill-a" in impl._region and sched.stats["items_spilled"] == 1
    lang = receiving_endpoint(sched, ranks)
    assert lang.allocator.free_blocks == lang.layout.num_blocks
    done, failed = step_until(sched, ranks, [req])
    assert not failed and done["lm-spill"] == (["spill-a"], [])
    assert same_bits(ranks[0][1]["spill-a"], embedding("spill-a", 100))


def test_transfers_progress_without_any_worker_step(producer, consumer_parts):
    """receive="scheduler": vLLM's V1 runner calls no EC connector on steps that run no tokens,
    so while every request waits for its items nothing runs on the workers.  The items must
    arrive anyway: only scheduler-side calls here until the item is a cache hit."""
    params = producer.encode("enc-v1", [("v1-a", 90)])
    sched, ranks = consumer_parts({})
    if sched._region is None:
        pytest.skip("receive='worker' transfers run on the workers (V2 runner only)")
    req = make_request("lm-v1", [("v1-a", 90)], params=params)
    deadline = time.monotonic() + 60
    while not sched.ensure_cache_available(req, 0):
        assert time.monotonic() < deadline, "the item never arrived without worker steps"
        time.sleep(0.01)
    assert sched.has_cache_item("v1-a")
    done, failed = step_until(sched, ranks, [req])
    assert done["lm-v1"] == (["v1-a"], []) and same_bits(ranks[0][1]["v1-a"], embedding("v1-a", 90))


def test_cached_item_is_published_again(producer, consumer_parts):
    """A second request for an image the producer already has cached is not re-encoded
    (save_caches does not fire); start_save_caches publishes it again."""
    sched, ranks = consumer_parts({})
    p1 = producer.encode("enc-1", [("img-x", 40)])
    done, failed = step_until(sched, ranks, [make_request("lm-1", [("img-x", 40)], params=p1)])
    assert done["lm-1"][0] == ["img-x"] and not failed
    # the consumer frees it from its encoder cache; a new request needs it again
    ranks[0][1].clear()
    p2 = producer.encode("enc-2", [("img-x", 40), ("img-y", 9)])
    req2 = make_request("lm-2", [("img-x", 40), ("img-y", 9)], params=p2)
    done, failed = step_until(sched, ranks, [req2], freed=["img-x"])
    assert sorted(done["lm-2"][0]) == ["img-x", "img-y"] and not failed
    assert same_bits(ranks[0][1]["img-x"], embedding("img-x", 40))
    assert same_bits(ranks[0][1]["img-y"], embedding("img-y", 9))


def test_a_published_item_serves_several_consumers(producer, consumer_parts):
    """Two language instances (two schedulers) ask for the same item, one after the other:
    the producer keeps it published, both get it bit for bit (no 60 s wait, no recompute)."""
    params = producer.encode("enc-2c", [("shared", 70)])
    for name in ("first", "second"):
        sched, ranks = consumer_parts({})
        done, failed = step_until(sched, ranks, [make_request(f"lm-{name}", [("shared", 70)], params=params)],
                                  deadline_s=30)
        assert not failed and done[f"lm-{name}"] == (["shared"], []), name
        assert same_bits(ranks[0][1]["shared"], embedding("shared", 70)), name


def test_tensor_parallel_consumer_every_rank_gets_a_copy(producer, consumer_parts, receive):
    sched, ranks = consumer_parts({}, tp=2)
    items = [("tp-a", 33), ("tp-b", 129)]
    params = producer.encode("enc-tp", items)
    done, failed = step_until(sched, ranks, [make_request("lm-tp", items, params=params)])
    assert not failed and sorted(done["lm-tp"][0]) == ["tp-a", "tp-b"]
    for _, cache in ranks:
        for h, n in items:
            assert same_bits(cache[h], embedding(h, n))
    for h, _ in items:                                  # each rank holds its own copy
        assert ranks[0][1][h].data_ptr() != ranks[1][1][h].data_ptr()
    if receive == "worker":
        # the engine's ranks are one TP group, named after vLLM's engine id
        groups = {worker._lang.tp_group for worker, _ in ranks}
        assert len(groups) == 1 and groups.pop().startswith("vllm-")
    if receive == "scheduler":
        # written once per host: one transfer per item for both ranks
        assert sched._lang.stats["requests"] == 2 and sched.stats["items_received"] == 2
        finish_step(sched, run_workers(ranks, *schedule(sched, [])))
        assert sched._region.pinned() == 0            # both ranks reported their loads


def test_preempted_request_gets_its_item_again(producer, consumer_parts):
    """An item delivered once and then freed by vLLM (preemption) is a cache hit again: still
    landed (receive="scheduler") or asked again from the producer, which keeps it."""
    params = producer.encode("enc-p", [("img-p", 21)])
    sched, ranks = consumer_parts({})
    req = make_request("lm-p", [("img-p", 21)], params=params)
    so, scheduled = schedule(sched, [req])
    deadline = time.monotonic() + 60
    while not scheduled:
        assert time.monotonic() < deadline
        finish_step(sched, run_workers(ranks, so, scheduled))
        so, scheduled = schedule(sched, [req])
    out = run_workers(ranks, so, scheduled)
    assert scheduled[0][1] == [0] and same_bits(ranks[0][1]["img-p"], embedding("img-p", 21))
    finish_step(sched, out)
    ranks[0][1].clear()                                   # preempted: vLLM frees its encoder cache entry
    done, failed = step_until(sched, ranks, [req], freed=["img-p"])
    assert not failed and done["lm-p"] == (["img-p"], [])
    assert same_bits(ranks[0][1]["img-p"], embedding("img-p", 21))
    assert sched.stats["local_encodes"] == 0


def test_worker_metadata_aggregates_across_ranks():
    a = EmbresumeECWorkerMetadata(loaded=[1, 2], staged=frozenset({"x", "y"}), failed={"z": "r0"})
    b = EmbresumeECWorkerMetadata(loaded=[1], staged=frozenset({"y"}), failed={"w": "r1"})
    m = a.aggregate(b)
    assert m.staged == {"y"} and m.failed == {"z": "r0", "w": "r1"} and sorted(m.loaded) == [1, 1, 2]


def test_wrong_size_is_recomputed_not_crashed(producer, consumer_parts):
    """The encoder's tensor does not match the consumer's placeholder count: it is refused,
    and vLLM encodes the item locally (the request has its media)."""
    params = producer.encode("enc-w", [("img-w", 50)])
    sched, ranks = consumer_parts({})
    req = make_request("lm-w", [("img-w", 48)], params=params)
    done, failed = step_until(sched, ranks, [req])
    assert not failed and done["lm-w"] == ([], ["img-w"])
    assert sched.stats["recomputes"] == 1 and sched.stats["transfer_failures"] == 1


def test_unreachable_encoder_fails_over_in_seconds(consumer_parts):
    """Nothing listens at the encoder address: no exception reaches the engine, and within
    seconds (not request_timeout) a request with its media is encoded locally; one whose item
    is metadata only (vLLM 0.33's EC consumer items), or without data, or with
    on_failure=fail, is failed."""
    dead = f"tcp://127.0.0.1:{free_port()}"
    extra = {"encoder_addresses": [dead], "handshake_timeout": 1.0, "request_timeout": 60.0,
             "failover_timeout": 1.0, "max_attempts": 2}
    sched, ranks = consumer_parts(extra)
    with_media = make_request("m", [("dead-1", 20)])
    without = make_request("n", [("dead-2", 20)], media=False)
    meta_only = make_request("q", [("dead-4", 20)], media="meta")
    t0 = time.monotonic()
    done, failed = step_until(sched, ranks, [with_media, without, meta_only], deadline_s=45)
    assert done == {"m": ([], ["dead-1"])} and failed == {"n", "q"}
    if sched._region is not None:
        assert time.monotonic() - t0 < 30, "fail-over took as long as request_timeout"
        assert sched.stats["failovers"] >= 1 and sched.stats["transfer_failures"] == 3
        assert sched.stats["recomputes"] == 1 and sched.stats["unavailable"] == 2

    sched2, ranks2 = consumer_parts(dict(extra, on_failure="fail"))
    done, failed = step_until(sched2, ranks2, [make_request("o", [("dead-3", 20)])], deadline_s=45)
    assert done == {} and failed == {"o"}


def test_silent_producer_fails_over(producer, consumer_parts):
    """The producer is alive but never publishes the item (stuck, or it lost it): after
    failover_timeout per attempt the item is recomputed, not waited for for a minute."""
    sched, ranks = consumer_parts({"failover_timeout": 1.0, "max_attempts": 2})
    if sched._region is None:
        pytest.skip("receive='worker' bounds a transfer by load_timeout only")
    params = {"never-sent": {adapter.PARAM_KEY: producer.address, "num_embeds": 12}}
    t0 = time.monotonic()
    done, failed = step_until(sched, ranks, [make_request("lm-s", [("never-sent", 12)], params=params)],
                              deadline_s=30)
    assert done == {"lm-s": ([], ["never-sent"])} and not failed
    assert time.monotonic() - t0 < 20
    assert sched.stats["failovers"] == 1 and sched.stats["recomputes"] == 1


def test_finished_request_drops_its_transfer(consumer_parts):
    """A request that ends while its item is in flight: the transfer is aborted (no staged
    tensor, nothing landed, nothing left pending)."""
    dead = f"tcp://127.0.0.1:{free_port()}"
    sched, ranks = consumer_parts({"encoder_addresses": dead, "handshake_timeout": 5.0})
    req = make_request("gone", [("gone-1", 10)])
    so, scheduled = schedule(sched, [req])
    finish_step(sched, run_workers(ranks, so, scheduled))
    worker = ranks[0][0]
    if sched._region is None:
        assert "gone-1" in worker._inflight
    else:
        assert "gone-1" in sched._items
    sched.request_finished(req)
    so, scheduled = schedule(sched, [])
    if sched._region is None:
        assert so.ec_connector_metadata.drops == ["gone-1"]
    finish_step(sched, run_workers(ranks, so, scheduled))
    if sched._region is None:                  # the workers receive: nothing left on them
        assert not worker._inflight and not worker._staged
    assert not sched.has_pending_push_work()
    assert not sched._items and (sched._region is None or "gone-1" not in sched._region)


def test_landing_region_evicts_unpinned_items_first():
    from embresume.integrations._landing import LandingRegion, LandingView
    region = LandingRegion(64 * 1024)
    try:
        a = region.alloc("a", (16, 256), torch.float32)      # 16 KiB each
        region.alloc("b", (16, 256), torch.float32)
        region.alloc("c", (16, 256), torch.float32)
        region.tensor(a).fill_(1.0)
        region.pin("a")
        region.get("b")                                       # b used more recently than c
        d = region.alloc("d", (32, 256), torch.float32)       # 32 KiB: c must go (a pinned, b recent)
        assert d is not None and "c" not in region and {"a", "b", "d"} <= {k for k in ("a", "b", "d") if k in region}
        assert region.alloc("e", (64, 256), torch.float32) is None or "a" in region
        assert "a" in region and region.evictions >= 1
        # a worker's mapping of the same memory (through /proc/<pid>/fd) sees the bytes
        view = LandingView(region.descriptor())
        assert torch.equal(view.tensor(a.offset, a.shape, a.dtype), torch.ones(16, 256))
        view.close()
        region.unpin("a")
        for key in list(("a", "b", "d")):
            region.discard(key)
        assert region.used == 0 and region._free == [(0, region.size)]
    finally:
        region.close()


def test_landing_region_lands_and_loads_without_page_faults():
    """The scheduler's region and a worker's view of it are mapped up front: landing an
    item into pages the region has not used yet, and a worker's first read of them, take
    no fault per page (4096 of them for this 16 MiB item; 10 ms of a 16.5 MB item's landing
    on the bench machine)."""
    import resource
    import numpy as np
    from embresume.integrations._landing import LandingRegion, LandingView
    from embresume.integrations._vllm_consumer import host_copy
    from embresume.ipc.shm import ShmSegment, _populate
    probe = ShmSegment.create(4096, tag="probe", prefault=False)
    try:
        if not _populate(probe._mm, write=False):
            pytest.skip("this kernel has no MADV_POPULATE_* (before 5.14)")
    finally:
        probe.close()

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    src = torch.ones(2048, 4096, dtype=torch.bfloat16)      # 16 MiB
    region = LandingRegion(64 << 20)
    try:
        e = region.alloc("big", tuple(src.shape), src.dtype)
        f0 = faults()
        host_copy(region.tensor(e), src)
        landed = faults() - f0
        view = LandingView(region.descriptor())
        try:
            dst = torch.zeros_like(src)
            dst.fill_(2)
            f0 = faults()
            np.copyto(dst.view(torch.int16).numpy(), view.tensor(e.offset, e.shape, e.dtype).view(torch.int16).numpy())
            loaded = faults() - f0
        finally:
            view.close()
        assert torch.equal(dst, src)
        assert landed < 256 and loaded < 64, (landed, loaded)
    finally:
        region.close()


def test_producer_holds_at_most_producer_max_bytes():
    """Every output is published for consumers, but the producer holds at most
    producer_max_bytes: the least recently used idle items are withdrawn."""
    port = free_port()
    cfg = vllm_config("ec_producer", dict(BASE_EXTRA, encoder_address=f"tcp://127.0.0.1:{port}",
                                          producer_max_bytes=3 * 100 * HIDDEN * 2))
    worker = EmbresumeECConnector(cfg, ECConnectorRole.WORKER)
    try:
        for i in range(5):
            worker.save_caches({f"p{i}": embedding(f"p{i}", 100)}, f"p{i}")
        deadline = time.monotonic() + 10
        while worker.stats["items_published"] < 5:
            assert time.monotonic() < deadline, worker.stats
            time.sleep(0.01)
        assert worker._publisher.held_bytes <= 3 * 100 * HIDDEN * 2
        assert worker.stats["items_withdrawn"] == 2
        # the two least recently published are let go, the others still wait for consumers
        assert worker._enc.poll("p0") is Status.Failed and worker._enc.poll("p1") is Status.Failed
        assert not worker._enc.poll("p4").terminal
    finally:
        worker.shutdown()


def test_deepstack_width_comes_from_the_encoder(consumer_parts):
    """A DeepStack encoder's output is wider than the LM: the producer publishes what the
    encoder produced (its endpoint takes that width) and announces the width; the consumer
    receives it at that width instead of refusing it."""
    wide = 2 * HIDDEN
    port = free_port()
    extra = {k: v for k, v in BASE_EXTRA.items() if k != "hidden_size"}
    pcfg = vllm_config("ec_producer", dict(extra, encoder_address=f"tcp://127.0.0.1:{port}"))
    PRODUCERS.append(f"tcp://127.0.0.1:{port}")
    pcfg.ec_transfer_config.mm_encoder_output_widths = {"image": wide}    # measured by vLLM at start-up
    producer_worker = EmbresumeECConnector(pcfg, ECConnectorRole.WORKER)
    producer_sched = EmbresumeECConnector(pcfg, ECConnectorRole.SCHEDULER)
    try:
        g = torch.Generator().manual_seed(7)
        tensor = torch.randn(30, wide, generator=g).to(DTYPE)
        producer_worker.save_caches({"deep": tensor}, "deep")
        _, params = producer_sched.request_finished(make_request("enc-d", [("deep", 30)]))
        assert params["deep"]["width"] == wide
        # the consumer's model would give the width (hidden x (1 + DeepStack levels): the
        # Qwen3-VL test below); this config has no model, so the option names it
        sched, ranks = consumer_parts({"item_widths": [wide]})
        if sched._region is None:
            pytest.skip("receive='worker' pools have the configured width")
        done, failed = step_until(sched, ranks, [make_request("lm-d", [("deep", 30)], params=params)],
                                  deadline_s=30)
        assert not failed and done["lm-d"] == (["deep"], [])
        assert same_bits(ranks[0][1]["deep"], tensor)
    finally:
        producer_worker.shutdown()
        producer_sched.shutdown()


def test_routing_by_hash_is_stable():
    addrs = ["tcp://a:1", "tcp://b:2", "tcp://c:3"]
    picks = {h: adapter.pick_encoder(h, addrs) for h in (f"h{i}" for i in range(200))}
    assert set(picks.values()) == set(addrs)
    assert picks == {h: adapter.pick_encoder(h, addrs) for h in picks}


def test_worker_mode_names_a_transfer_again_until_a_worker_starts_it(producer, consumer_parts, receive):
    """receive="worker": a step whose metadata no worker sees (V1 skips the connector on
    steps without tokens) must not lose the transfer: it is named again until a worker
    reports it started, and the item arrives."""
    if receive != "worker":
        pytest.skip("receive='scheduler' starts transfers in the scheduler")
    params = producer.encode("enc-rs", [("resend", 17)])
    sched, ranks = consumer_parts({})
    req = make_request("lm-rs", [("resend", 17)], params=params)
    so, scheduled = schedule(sched, [req])
    assert [s.mm_hash for s in so.ec_connector_metadata.loads] == ["resend"]
    # no worker ran that step; the next metadata names it again
    so, scheduled = schedule(sched, [req])
    assert [s.mm_hash for s in so.ec_connector_metadata.loads] == ["resend"]
    done, failed = step_until(sched, ranks, [req], deadline_s=30)
    assert not failed and done["lm-rs"] == (["resend"], [])
    assert same_bits(ranks[0][1]["resend"], embedding("resend", 17))


def test_items_the_producer_will_refuse_are_not_advertised():
    """ec_transfer_params name the encoder only for items the producer will publish: one
    over producer_max_bytes, or of another width than a fixed hidden_size, is left to the
    consumer to encode (no consumer waits for an item that never comes)."""
    cfg = vllm_config("ec_producer", dict(BASE_EXTRA, producer_max_bytes=100 * HIDDEN * 2))
    cfg.ec_transfer_config.mm_encoder_output_widths = {"image": HIDDEN}
    sched = EmbresumeECConnector(cfg, ECConnectorRole.SCHEDULER)
    try:
        _, params = sched.request_finished(make_request("enc-big", [("small", 100), ("big", 101)]))
        assert params["small"][adapter.PARAM_KEY] and params["small"]["width"] == HIDDEN
        assert adapter.PARAM_KEY not in params["big"] and "producer_max_bytes" in params["big"]["embresume_not_published"]
        cfg.ec_transfer_config.mm_encoder_output_widths = {"image": 3 * HIDDEN}     # DeepStack, but fixed width
        _, params = sched.request_finished(make_request("enc-wide", [("wide", 10)]))
        assert adapter.PARAM_KEY not in params["wide"]
    finally:
        sched.shutdown()


def test_two_instances_ask_for_one_item_at_once(producer, consumer_parts):
    """Two language instances ask for the same item at the same moment: the encoder sends it
    to one and refuses the other while that runs; the refused one waits for the item to be
    published again (no failed attempt) and both get it bit for bit, none recomputes."""
    params = producer.encode("enc-cc", [("both", 3000)])
    a, b = consumer_parts({}), consumer_parts({})
    if a[0]._region is None:
        pytest.skip("receive='worker' asks once per step; covered by the sequential test")
    reqs = {name: make_request(f"lm-{name}", [("both", 3000)], params=params) for name in "ab"}
    deadline = time.monotonic() + 60
    ready = set()
    while len(ready) < 2:
        assert time.monotonic() < deadline, "an instance never got the item"
        for name, (sched, _) in (("a", a), ("b", b)):
            if name not in ready and sched.ensure_cache_available(reqs[name], 0):
                ready.add(name)
        time.sleep(0.002)
    for name, (sched, ranks) in (("a", a), ("b", b)):
        done, failed = step_until(sched, ranks, [reqs[name]], deadline_s=30)
        assert not failed and done[f"lm-{name}"] == (["both"], []), name
        assert same_bits(ranks[0][1]["both"], embedding("both", 3000)), name
        assert sched.stats["recomputes"] == 0 and sched.stats["transfer_failures"] == 0, sched.stats


def test_an_announced_width_is_bounded(consumer_parts):
    """ec_transfer_params come with the request (a client can send them through the OpenAI
    server): a width that is not one of the model's (here: hidden_size and ``item_widths``)
    is refused, not believed; no pool of that width is made.  Before: any width in
    [1, 65536] made a receive pool of its own (up to 3 more) for the process's life."""
    sched, _ = consumer_parts({"item_widths": [2 * HIDDEN]})
    for bad in (10 ** 9, 65536, 3 * HIDDEN, -3, "wide"):
        req = make_request("lm-bw", [("bw", 5)], params={"bw": {"width": bad}})
        encoder, width, refusal = sched._ask(req, "bw")
        assert refusal and "width" in refusal, bad
    for ok in (None, HIDDEN, 2 * HIDDEN):
        req = make_request("lm-ok", [("ok", 5)], params={"ok": {"width": ok}})
        assert sched._ask(req, "ok")[1:] == (ok or HIDDEN, ""), ok


def test_hostile_params_connect_nowhere_and_make_no_pool(consumer_parts):
    """A request whose ec_transfer_params name an encoder outside the allow-list
    (encoder_addresses, allowed_encoders), or a width that is not the model's: nothing is
    connected to (a listening socket sees no connection), no pool is made, the item is
    recomputed where the request carries its media and the request fails where it does
    not; the refusal is counted once per request and item (``params_refused``).  Before:
    the consumer dialled any address a client named (a port-scan oracle) and made a
    receive pool for any width."""
    import socket
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.5)
    port = trap.getsockname()[1]
    hostile = f"tcp://127.0.0.1:{port}"
    # a loopback address is dialled first on the same host's abstract Unix socket: trap both
    local = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    local.bind(f"\0embresume/tcp/{port}")
    local.listen(8)
    local.settimeout(0.5)
    try:
        sched, ranks = consumer_parts({"on_failure": "recompute"})
        cases = [make_request("lm-h1", [("h1", 20)], params={"h1": {adapter.PARAM_KEY: hostile}}),
                 make_request("lm-h2", [("h2", 20)], params={adapter.PARAM_KEY: hostile}),
                 make_request("lm-h3", [("h3", 20)], params={"h3": {"width": 65536}})]
        done, failed = step_until(sched, ranks, cases, deadline_s=20)
        assert not failed and all(done[r.request_id] == ([], [r.mm_features[0].identifier]) for r in cases)
        meta_only = make_request("lm-h4", [("h4", 20)], params={"h4": {adapter.PARAM_KEY: hostile}}, media="meta")
        done, failed = step_until(sched, ranks, [meta_only], deadline_s=20)
        assert failed == {"lm-h4"}
        for listener in (trap, local):
            with pytest.raises(socket.timeout):
                listener.accept()                           # nobody ever dialled it
        assert sched.stats["params_refused"] == 4, sched.stats
        assert sched.stats["items_received"] == 0 and sched.stats["unavailable"] == 1
        assert hostile not in getattr(receiving_endpoint(sched, ranks), "_encoders", {})
        if sched._region is not None:
            assert set(sched._langs) == {HIDDEN}            # no pool for the announced width
    finally:
        trap.close()
        local.close()


def test_an_item_larger_than_the_landing_region_fails_at_once(producer, consumer_parts):
    """An item that can never fit the landing region is given up (recomputed, its pool
    blocks back) instead of holding the receive pool while it waits for room."""
    params = producer.encode("enc-xl", [("xl", 2000)])                # 2000 x 256 bf16 = 1000 KiB
    sched, ranks = consumer_parts({"landing_bytes": "512KiB", "load_from_pool": False})
    if sched._region is None:
        pytest.skip("receive='worker' has no landing region")
    done, failed = step_until(sched, ranks, [make_request("lm-xl", [("xl", 2000)], params=params)],
                              deadline_s=30)
    assert not failed and done["lm-xl"] == ([], ["xl"])
    assert sched.stats["transfer_failures"] == 1 and sched.stats["recomputes"] == 1
    assert sched._lang.allocator.free_blocks == sched._lang.layout.num_blocks


def test_an_item_larger_than_the_landing_region_is_read_from_the_pool(producer, consumer_parts):
    """With load_from_pool (the default) the same item arrives in one chunk and the workers
    read it from the receive pool: the region's size does not matter to it."""
    params = producer.encode("enc-xl2", [("xl2", 2000)])
    sched, ranks = consumer_parts({"landing_bytes": "512KiB"})
    if sched._region is None:
        pytest.skip("receive='worker' has no landing region")
    done, failed = step_until(sched, ranks, [make_request("lm-xl2", [("xl2", 2000)], params=params)],
                              deadline_s=30)
    assert not failed and done["lm-xl2"] == (["xl2"], [])
    assert same_bits(ranks[0][1]["xl2"], embedding("xl2", 2000))
    assert sched.stats["items_held_in_pool"] == 1 and sched.stats["recomputes"] == 0


# ------------------------------------------------------------------ refusal codes
def _in_process_producer():
    """A producer's worker (encoder endpoint, publisher) and scheduler (params) in this process."""
    address = f"tcp://127.0.0.1:{free_port()}"
    PRODUCERS.append(address)
    pcfg = vllm_config("ec_producer", dict(BASE_EXTRA, encoder_address=address))
    return EmbresumeECConnector(pcfg, ECConnectorRole.WORKER), EmbresumeECConnector(pcfg, ECConnectorRole.SCHEDULER)


def test_an_item_the_producer_let_go_of_is_given_up_at_once(consumer_parts, receive):
    """The producer withdrew the item (producer_max_bytes) before the consumer asked: the
    encoder answers NOT_PUBLISHED at once, and the consumer recomputes the item now, in one
    attempt, instead of waiting out failover_timeout x max_attempts for data that is gone."""
    from embresume.errors import FailCode, NotPublished
    producer_worker, producer_sched = _in_process_producer()
    try:
        tensor = embedding("let-go", 30)
        producer_worker.save_caches({"let-go": tensor}, "let-go")
        deadline = time.monotonic() + 10
        while producer_worker.stats["items_published"] < 1:
            assert time.monotonic() < deadline, producer_worker.stats
            time.sleep(0.01)
        # what the publisher does past its bound (on its thread: here nothing else runs on it)
        assert producer_worker._publisher.withdraw("let-go")
        _, params = producer_sched.request_finished(make_request("enc-lg", [("let-go", 30)]))
        assert params["let-go"][adapter.PARAM_KEY]
        # without the code this would wait 60 s per attempt: the step loop's deadline is far shorter
        sched, ranks = consumer_parts({"failover_timeout": 60.0, "max_attempts": 3})
        lang = receiving_endpoint(sched, ranks)
        raised = []
        orig = lang.result

        def result(room):
            try:
                return orig(room)
            except Exception as e:
                raised.append(e)
                raise
        lang.result = result
        done, failed = step_until(sched, ranks, [make_request("lm-lg", [("let-go", 30)], params=params)],
                                  deadline_s=20)
        assert not failed and done["lm-lg"] == ([], ["let-go"])        # recomputed locally
        assert [type(e) for e in raised] == [NotPublished] and raised[0].code is FailCode.NOT_PUBLISHED
        assert lang.stats["requests"] == 1                              # one attempt: no retry of a gone item
        assert sched.stats["failovers"] == 0 and sched.stats["recomputes"] == 1
        if sched._region is not None:
            assert sched.stats["transfer_failures"] == 1
    finally:
        producer_worker.shutdown()
        producer_sched.shutdown()


def test_a_busy_room_is_asked_again_by_its_code_not_its_text(consumer_parts, monkeypatch):
    """Instance A asked for an item before the producer published it (its room waits with A's
    rank); instance B's request is refused (the room belongs to A's TP group).  B asks again
    shortly, without counting a failed attempt, because of the refusal's code: the encoder's
    reason texts are reworded here, so no text comparison could recognise them.  Once the item
    is published both get it, none recomputes."""
    from embresume.errors import FailCode, RoomBusy
    from embresume.rooms import encoder as RE

    orig_reject = RE.EncoderRooms._reject

    def reworded(self, s, room, reason, out, *code):
        return orig_reject(self, s, room, "refused (reworded: no known phrase here)", out, *code)
    monkeypatch.setattr(RE.EncoderRooms, "_reject", reworded)
    producer_worker, producer_sched = _in_process_producer()
    try:
        sched_a, ranks_a = consumer_parts({})
        if sched_a._region is None:
            pytest.skip("receive='worker' does not ask again within a step")
        sched_b, ranks_b = consumer_parts({"failover_timeout": 60.0})
        _, params = producer_sched.request_finished(make_request("enc-busy", [("busy", 40)]))
        req_a = make_request("lm-a", [("busy", 40)], params=params)
        req_b = make_request("lm-b", [("busy", 40)], params=params)
        assert not sched_a.ensure_cache_available(req_a, 0)
        rooms = producer_worker._enc._rooms
        deadline = time.monotonic() + 20
        while not ("busy" in rooms and len(rooms["busy"].ranks) == 1):
            assert time.monotonic() < deadline, "instance A's request never reached the producer"
            sched_a.ensure_cache_available(req_a, 0)
            time.sleep(0.01)
        lang_b = sched_b._lang
        refusals = []
        orig_result = lang_b.result

        def result(room):
            try:
                return orig_result(room)
            except Exception as e:
                refusals.append(e)
                raise
        lang_b.result = result
        deadline = time.monotonic() + 20
        while len(refusals) < 3:                             # refused, asked again, refused again...
            assert time.monotonic() < deadline, (refusals, sched_b._items)
            assert not sched_b.ensure_cache_available(req_b, 0)
            time.sleep(0.01)
        assert all(type(e) is RoomBusy and e.code in (FailCode.TP_GROUP, FailCode.BUSY) for e in refusals)
        assert all("reworded" in e.reason for e in refusals)
        it = sched_b._items["busy"]
        # none counted as an attempt (a refused one is handed back while it waits to ask again)
        assert it.attempts <= 1 and sched_b.stats["failovers"] == 0 and sched_b.stats["transfer_failures"] == 0
        # the item is published: A gets it, then B (the producer publishes it again after A's)
        producer_worker.save_caches({"busy": embedding("busy", 40)}, "busy")
        for name, sched, ranks, req in (("a", sched_a, ranks_a, req_a), ("b", sched_b, ranks_b, req_b)):
            done, failed = step_until(sched, ranks, [req], deadline_s=30)
            assert not failed and done[f"lm-{name}"] == (["busy"], []), name
            assert same_bits(ranks[0][1]["busy"], embedding("busy", 40)), name
            assert sched.stats["recomputes"] == 0 and sched.stats["transfer_failures"] == 0, sched.stats
    finally:
        producer_worker.shutdown()
        producer_sched.shutdown()


# ------------------------------------------------------------------ with vLLM's real encoder cache manager
def ecm_schedule(sched, ecm, requests):
    """One Scheduler.schedule() of vLLM 0.33 for one-step prompts, with the real
    ``EncoderCacheManager``: ensure_cache_available, then per item (_try_schedule_encoder_inputs)
    check_and_update_cache (a hit asks the connector nothing), can_allocate, has_cache_item,
    then _allocate_encoder_inputs (allocate + update_state_after_alloc); the step's
    SchedulerOutput carries get_freed_mm_hashes().  Returns (SchedulerOutput, scheduled)."""
    scheduled = []
    for req in requests:
        if not sched.ensure_cache_available(req, req.num_computed_tokens):
            continue
        ext, local, alloc, budget = [], [], [], 10 ** 6
        for i, f in enumerate(req.mm_features):
            if ecm.check_and_update_cache(req, i):
                continue
            assert ecm.can_allocate(req, i, budget, 0)
            (ext if sched.has_cache_item(f.identifier) else local).append(i)
            alloc.append(i)
        for i in alloc:
            ecm.allocate(req, i)
            sched.update_state_after_alloc(req, i)
        scheduled.append((req, ext, local))
    so = SchedulerOutput.make_empty()
    so.free_encoder_mm_hashes = ecm.get_freed_mm_hashes()
    so.ec_connector_metadata = sched.build_connector_meta(so)
    return so, scheduled


def ecm_run(sched, ranks, ecm, requests, *, finish=True, deadline_s=60.0):
    """Step until every request ran its step; each then finishes (ecm.free +
    request_finished) unless ``finish`` is false.  Returns {rid: (ext, local)}."""
    done, pending = {}, list(requests)
    deadline = time.monotonic() + deadline_s
    while pending:
        assert time.monotonic() < deadline, f"requests never scheduled: {[r.request_id for r in pending]}"
        so, scheduled = ecm_schedule(sched, ecm, pending)
        out = run_workers(ranks, so, scheduled)
        assert not finish_step(sched, out)
        for req, ext, local in scheduled:
            done[req.request_id] = ([req.mm_features[i].identifier for i in ext],
                                    [req.mm_features[i].identifier for i in local])
            pending.remove(req)
            if finish:
                ecm.free(req)
                sched.request_finished(req)
        time.sleep(0.005)
    # one more step: the last load reports unpin
    finish_step(sched, run_workers(ranks, *ecm_schedule(sched, ecm, [])))
    return done


def _landing_consumer(consumer_parts, items_that_fit: int, tokens: int, **extra):
    nbytes = -(-tokens * HIDDEN * 2 // 4096) * 4096
    sched, ranks = consumer_parts({"landing_bytes": items_that_fit * nbytes + 1, **extra})
    if sched._region is None:
        pytest.skip("receive='worker' has no landing region")
    return sched, ranks


def test_many_requests_on_a_small_landing_region_one_transfer_per_item(producer, consumer_parts):
    """12 one-image prompts, all waiting at once, on a landing region that holds 2 items:
    nothing lands inside has_cache_item, an item reported present stays until the workers
    loaded it, received items wait in the receive pool instead of evicting what is about to
    be loaded: every item comes in one transfer, every load is one the workers make."""
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
    items = [(f"many-{i}", 100) for i in range(12)]
    params = producer.encode("enc-many", items)
    sched, ranks = _landing_consumer(consumer_parts, 2, 100)
    ecm = EncoderCacheManager(cache_size=100 * 100)
    reqs = [make_request(f"lm-many-{i}", [item], params=params) for i, item in enumerate(items)]
    done = ecm_run(sched, ranks, ecm, reqs)
    transfers = sched._lang.stats["requests"]
    print(f"12 items on a 2-item landing region: {transfers} transfers, "
          f"{sched._region.evictions} evictions, stats {sched.stats}")
    assert all(done[r.request_id] == ([h], []) for r, (h, _) in zip(reqs, items)), done
    for h, n in items:
        assert same_bits(ranks[0][1][h], embedding(h, n)), h
    assert transfers == len(items) and sched.stats["items_received"] == len(items)
    assert sum(w.stats["items_loaded"] for w, _ in ranks) == len(items)
    assert sched._region.pinned() == 0 and not sched.has_pending_push_work()


def test_an_item_reported_present_is_not_evicted_in_the_same_step(producer, consumer_parts):
    """A region that holds one item; two requests with an item each, both arrived.  The
    first is reported present (has_cache_item); landing the second must not take its place
    before update_state_after_alloc names it (vLLM would schedule a load no worker can make)."""
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
    items = [("same-step-a", 100), ("same-step-b", 100)]
    params = producer.encode("enc-same-step", items)
    sched, ranks = _landing_consumer(consumer_parts, 1, 100)
    reqs = [make_request(f"lm-{h}", [(h, n)], params=params) for h, n in items]
    for req in reqs:                          # both transfers start
        assert not sched.ensure_cache_available(req, 0)
    deadline = time.monotonic() + 30
    while not all(sched._lang.poll(h) is Status.Success for h, _ in items):
        assert time.monotonic() < deadline, "the items never arrived"
        time.sleep(0.01)
    ecm = EncoderCacheManager(cache_size=10 ** 4)
    done = ecm_run(sched, ranks, ecm, reqs)
    assert done == {f"lm-{h}": ([h], []) for h, _ in items}, done
    assert sched.stats["local_encodes"] == 0 and sched._lang.stats["requests"] == 2


def test_a_released_reference_is_no_eviction(producer, consumer_parts):
    """update_state_after_free releases one request's reference; vLLM keeps the item while
    another request references it (and after, until it needs the room).  A third request
    then hits vLLM's encoder cache: no transfer for it, even though the landing region let
    the item go."""
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
    items = [("ref-x", 100), ("ref-y", 100)]
    params = producer.encode("enc-ref", items)
    sched, ranks = _landing_consumer(consumer_parts, 1, 100)
    ecm = EncoderCacheManager(cache_size=10 ** 4)
    r1, r2, ry, r3 = (make_request(f"lm-ref-{n}", [it], params=params)
                      for n, it in (("1", items[0]), ("2", items[0]), ("y", items[1]), ("3", items[0])))
    assert ecm_run(sched, ranks, ecm, [r1], finish=False)["lm-ref-1"] == (["ref-x"], [])
    assert ecm_run(sched, ranks, ecm, [r2], finish=False)["lm-ref-2"] == ([], [])   # vLLM's cache hit
    ecm.free_encoder_input(r1, 0)                  # r1 is past its image: Scheduler._free_encoder_input
    sched.update_state_after_free(r1, 0)
    assert ecm_run(sched, ranks, ecm, [ry])["lm-ref-y"] == (["ref-y"], [])   # lands where ref-x was
    assert "ref-x" not in sched._region
    before = sched._lang.stats["requests"]
    assert ecm_run(sched, ranks, ecm, [r3])["lm-ref-3"] == ([], [])          # vLLM still holds it
    print(f"after a released reference: {sched._lang.stats['requests'] - before} transfer(s) for an item "
          f"vLLM holds")
    assert sched._lang.stats["requests"] == before, "a transfer for an item vLLM's encoder cache holds"


def test_after_a_reset_a_metadata_only_item_is_received_again(producer, consumer_parts):
    """reset_encoder_cache (weights updated) never reaches the connector.  An item vLLM held
    before the reset, metadata only (what vLLM 0.33 gives EC consumers: nothing to encode
    locally) and no longer landed, must be received again, not sent to local encoding."""
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
    items = [("reset-x", 100), ("reset-y", 100)]
    params = producer.encode("enc-reset", items)
    sched, ranks = _landing_consumer(consumer_parts, 1, 100)
    ecm = EncoderCacheManager(cache_size=10 ** 4)
    r1 = make_request("lm-reset-1", [items[0]], params=params, media="meta")
    ry = make_request("lm-reset-y", [items[1]], params=params, media="meta")
    r2 = make_request("lm-reset-2", [items[0]], params=params, media="meta")
    assert ecm_run(sched, ranks, ecm, [r1], finish=False)["lm-reset-1"] == (["reset-x"], [])
    assert ecm_run(sched, ranks, ecm, [ry])["lm-reset-y"] == (["reset-y"], [])
    assert "reset-x" not in sched._region
    ecm.reset()                                     # Scheduler.reset_encoder_cache
    for _, cache in ranks:
        cache.clear()                               # the runner's reset_encoder_cache
    done = ecm_run(sched, ranks, ecm, [r2])
    print(f"after a reset: {done['lm-reset-2']} (external loads, local encodes), stats {sched.stats}")
    assert done["lm-reset-2"] == (["reset-x"], []) and sched.stats["local_encodes"] == 0
    assert same_bits(ranks[0][1]["reset-x"], embedding("reset-x", 100))


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_pipeline_parallel_loads_are_unpinned(producer, runner, monkeypatch):
    """Two pipeline stages, multiprocessing executor: only the first stage loads.  vLLM's V2
    runner passes the first stage's EC output on from a non-last rank
    (``with_ec_conn_output(with_kv_conn_output_only(..), ec_output)``); the V1 runner returns
    ``with_kv_conn_output_only`` there and drops it, and its last stage never runs the EC
    connector.  Either way the landed item's pin must end (it would hold its room forever)."""
    from vllm.config import VllmConfig as _VC
    monkeypatch.setattr(_VC, "use_v2_model_runner", property(lambda self: runner == "v2"))
    params = producer.encode(f"enc-pp-{runner}", [(f"pp-{runner}", 20)])
    cfg = vllm_config("ec_consumer", {**BASE_EXTRA, "landing_bytes": "4MiB", "allowed_encoders": [producer.address]})
    cfg.parallel_config.pipeline_parallel_size = 2
    cfg.parallel_config.distributed_executor_backend = "mp"
    sched = EmbresumeECConnector(cfg, ECConnectorRole.SCHEDULER)
    stages = []
    for first in (True, False):
        orig = adapter._placement
        adapter._placement = lambda first=first: (0, 1, first)
        try:
            stages.append((EmbresumeECConnector(cfg, ECConnectorRole.WORKER), {}))
        finally:
            adapter._placement = orig
    try:
        req = make_request(f"lm-pp-{runner}", [(f"pp-{runner}", 20)], params=params)
        steps, loaded_at, reports = 0, None, 0
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, (runner, sched._items)
            so, scheduled = schedule(sched, [req] if loaded_at is None else [])
            (w0, c0), (w1, c1) = stages
            with active_for(w0, c0).maybe_get_output(so) as ec_out:
                for r, ext, local in scheduled:
                    assert ext == [0] and local == []
            first_out = ModelRunnerOutput.with_kv_conn_output_only(None)
            if runner == "v2":
                first_out = ModelRunnerOutput.with_ec_conn_output(first_out, ec_out)
            out = ECOutputAggregator().aggregate([first_out, EMPTY_MODEL_RUNNER_OUTPUT], 1)
            if out is not None and out.ec_connector_output is not None:
                reports += len(out.ec_connector_output.ec_connector_worker_meta.loaded)
            finish_step(sched, out)
            if scheduled:
                loaded_at = steps
                assert same_bits(c0[f"pp-{runner}"], embedding(f"pp-{runner}", 20))
                sched.request_finished(req)
            steps += 1
            if loaded_at is not None and sched._region.pinned() == 0 and not any(
                    p.pins for p in sched._in_pool.values()):
                break
            assert loaded_at is None or steps - loaded_at <= 8, f"{runner}: the pin never ends"
            time.sleep(0.01)
        print(f"{runner}: {reports} load report(s) reached the scheduler; unpinned "
              f"{steps - loaded_at} step(s) after the load")
        assert reports == (1 if runner == "v2" else 0)
        assert not sched.has_pending_push_work()
    finally:
        for w, _ in stages:
            w.shutdown()
        sched.shutdown()


# ------------------------------------------------------------------ issue 26's table, rows 1, 4, 6, 10
def test_deepstack_width_from_the_model_without_params():
    """Row 1: a consumer routed by encoder_addresses alone (no ec_transfer_params) receives at
    the encoder's width, which for Qwen3-VL is the LM width x (1 + DeepStack levels), as vLLM
    measures it on a producer; it accepts the LM width too and nothing else.  Before: the
    pool took the LM width, every handshake with the 4x-wide encoder was refused."""
    import types

    from transformers import Qwen3VLConfig
    from embresume.integrations._vllm_roles import Options, model_encoder_width

    hf = Qwen3VLConfig()
    hidden = hf.text_config.hidden_size
    levels = len(hf.vision_config.deepstack_visual_indexes)
    model = types.SimpleNamespace(hf_config=hf, get_inputs_embeds_size=lambda: hidden, dtype=DTYPE,
                                  multimodal_config=None)
    assert model_encoder_width(model) == hidden * (1 + levels) == 4 * hidden
    flat = types.SimpleNamespace(hf_config=types.SimpleNamespace(vision_config=types.SimpleNamespace()),
                                 get_inputs_embeds_size=lambda: hidden)
    assert model_encoder_width(flat) == hidden                     # Qwen2.5-VL: no DeepStack
    cfg = vllm_config("ec_consumer", {k: v for k, v in BASE_EXTRA.items() if k != "hidden_size"})
    cfg.model_config = model
    opts = Options(cfg, False, False, adapter.OWN_KEYS)
    assert opts.config.hidden_size == 4 * hidden
    assert opts.widths == {hidden, 4 * hidden}


def test_data_parallel_engines_get_a_port_and_a_group_each():
    """Row 4: every DP engine of an instance gets the instance's config, engine_id included.
    Each DP rank's producer binds encoder_address's port + its DP index and its endpoints
    form their own TP group.  Before: every DP engine's producer bound the same address
    (address in use, inside the model runner) and all DP engines were one TP group."""
    from embresume.integrations._vllm_roles import Options

    port = free_port()
    parts, groups = [], set()
    try:
        for dp_index in (0, 1):
            cfg = vllm_config("ec_producer", dict(BASE_EXTRA, encoder_address=f"tcp://127.0.0.1:{port}"))
            cfg.parallel_config.data_parallel_size = 2
            cfg.parallel_config.data_parallel_index = dp_index
            cfg.ec_transfer_config.engine_id = "one-instance"
            opts = Options(cfg, True, True, adapter.OWN_KEYS)
            assert opts.bind == f"tcp://127.0.0.1:{port + dp_index}"
            groups.add(opts.group)
            worker = EmbresumeECConnector(cfg, ECConnectorRole.WORKER)
            parts.append(worker)
            worker.save_caches({f"dp{dp_index}": embedding(f"dp{dp_index}", 8)}, f"dp{dp_index}")
            assert worker._enc is not None and worker._enc.address.endswith(f":{port + dp_index}")
        assert len(groups) == 2
    finally:
        for w in parts:
            w.shutdown()


def test_a_worker_that_cannot_reach_the_landing_region_refuses_at_start(monkeypatch):
    """Row 6: workers map the scheduler's landing region through /proc/<pid>/fd.  Where they
    cannot (a non-dumpable scheduler, a ptrace policy, another user or host) the connector
    says so with one clear error when it starts, naming the remedy.  Before: an OSError at
    the first landed item, inside the model runner, killed the engine."""
    import ctypes
    import os

    from embresume.errors import ConfigError
    cfg = vllm_config("ec_consumer", dict(BASE_EXTRA, landing_bytes="1MiB"))
    cfg.parallel_config.distributed_executor_backend = "mp"
    real_listdir = os.listdir

    def listdir(path):
        if str(path) == f"/proc/{os.getppid()}/fd":
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(ConfigError, match="receive='worker'"):
        EmbresumeECConnector(cfg, ECConnectorRole.WORKER)
    monkeypatch.setattr(os, "listdir", real_listdir)
    EmbresumeECConnector(cfg, ECConnectorRole.WORKER).shutdown()      # reachable: starts

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(4, 0, 0, 0, 0) == 0                           # PR_SET_DUMPABLE 0
    try:
        with pytest.raises(ConfigError, match="not dumpable"):
            EmbresumeECConnector(cfg, ECConnectorRole.SCHEDULER)
    finally:
        libc.prctl(4, 1, 0, 0, 0)


def test_landing_across_nodes_is_refused_at_start():
    """Row 6: receive='scheduler' shares host memory with the engine's workers; an engine
    whose workers span nodes (multi-node TP/PP) is refused at start with the remedy."""
    from embresume.errors import ConfigError
    cfg = vllm_config("ec_consumer", dict(BASE_EXTRA), tp=2)
    cfg.parallel_config.nnodes = 2
    with pytest.raises(ConfigError, match="spans 2 nodes.*receive='worker'"):
        EmbresumeECConnector(cfg, ECConnectorRole.SCHEDULER)


def test_producer_threads_are_not_bound_to_the_engines_cores():
    """Row 10: vLLM's CPU build pins each worker's threads to cores it picks; with two
    instances on one host both land on the same cores, and the encoder endpoint's threads
    (which inherited the pin) starved: handshakes timed out and the consumer silently
    recomputed everything.  The producer's endpoint and publisher threads now run on every
    core the process may use, while the engine's own thread keeps its binding."""
    import os
    import threading

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs thread affinity and 2 cores")
    cfg = vllm_config("ec_producer", dict(BASE_EXTRA, encoder_address=f"tcp://127.0.0.1:{free_port()}"))
    out = {}

    def engine_worker():                      # what vLLM's CPU worker does to its thread first
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        w = EmbresumeECConnector(cfg, ECConnectorRole.WORKER)
        w.save_caches({"pin": embedding("pin", 8)}, "pin")
        out["worker"], out["after"] = w, os.sched_getaffinity(0)
    t = threading.Thread(target=engine_worker)
    t.start()
    t.join(30)
    worker = out["worker"]
    try:
        ours = [th for th in threading.enumerate() if th.name.startswith(("embresume", "mooncake"))
                and th.native_id is not None]
        assert ours, [th.name for th in threading.enumerate()]
        cpus = {}
        for th in ours:
            with open(f"/proc/self/task/{th.native_id}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list"))
            cpus[th.name] = line.split(":", 1)[1].strip()
        assert len(out["after"]) == 1                                    # the engine's thread: as pinned
        narrow = {n: c for n, c in cpus.items() if "-" not in c and "," not in c}
        assert not narrow, f"embresume threads bound to one core: {narrow}"
    finally:
        worker.shutdown()


def test_recomputing_because_transfers_fail_is_loud(caplog):
    """Row 10: a consumer that recomputes because transfers fail answers correctly, so
    nothing looked wrong; now one ERROR line per interval says so, with the count and the
    last reason (and the recomputes / transfer_failures counters for a dashboard)."""
    import logging

    from embresume.integrations._vllm_roles import FailureAlarm
    now = [0.0]
    alarm = FailureAlarm(interval=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="embresume.integrations.vllm"):
        alarm.failed("handshake timed out")
        alarm.recomputed("a")
        alarm.recomputed("b")
        now[0] = 31.0
        alarm.recomputed("c")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 2 and "1 item(s)" in lines[0] and "2 item(s)" in lines[1], lines
    assert all("handshake timed out" in x and "not coming through embresume" in x for x in lines)


def test_totals_are_logged_when_the_engine_is_told_to_stop(caplog):
    """Row 11: the totals line docs/integrations.md promises appears when the server stops
    (SIGTERM / SIGINT), not only if vLLM reaches the connector's shutdown before its
    process manager kills the engine process.  vLLM's own handler still runs after it."""
    import logging
    import os
    import signal

    seen = []
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))   # vLLM's, in its engine
    try:
        cfg = vllm_config("ec_consumer", dict(BASE_EXTRA, landing_bytes="1MiB"))
        sched = EmbresumeECConnector(cfg, ECConnectorRole.SCHEDULER)
        try:
            sched.counters.add("items_received", 3)
            with caplog.at_level(logging.INFO, logger="embresume.integrations.vllm"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            assert seen == [signal.SIGTERM]                         # the engine's handler ran too
            lines = [r.getMessage() for r in caplog.records if "totals" in r.getMessage()]
            assert lines and "consumer, scheduler" in lines[0] and "'items_received': 3" in lines[0], lines
        finally:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="embresume.integrations.vllm"):
                sched.shutdown()
            assert not [r for r in caplog.records if "totals" in r.getMessage()]   # once
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)


# ------------------------------------------------------------------ issue 27: off the scheduler thread
def test_a_large_item_is_copied_into_the_region_off_the_scheduler_thread(producer, consumer_parts):
    """An item of at least ASYNC_LAND_BYTES is copied into the landing region by the lander
    thread, not on vLLM's scheduler thread; it lands bit for bit on a later poll and loads
    into encoder_cache as before."""
    import threading

    from embresume.integrations import _vllm_consumer as C
    tokens = C.ASYNC_LAND_BYTES // (HIDDEN * 2) + 50                 # just over the threshold in bf16
    params = producer.encode("enc-big", [("big", tokens)])
    sched, ranks = consumer_parts({"landing_bytes": "8MiB"})
    if sched._region is None:
        pytest.skip("receive='worker' has no landing region")
    copied_on = []
    real_copy = C.host_copy

    def host_copy(dst, src):
        if dst.data_ptr() >= sched._region.segment.raw.data_ptr() and \
                dst.data_ptr() < sched._region.segment.raw.data_ptr() + sched._region.size:
            copied_on.append(threading.current_thread().name)
        return real_copy(dst, src)
    C.host_copy = host_copy
    try:
        done, failed = step_until(sched, ranks, [make_request("lm-big", [("big", tokens)], params=params)],
                                  deadline_s=30)
    finally:
        C.host_copy = real_copy
    assert not failed and done["lm-big"] == (["big"], [])
    assert same_bits(ranks[0][1]["big"], embedding("big", tokens))
    assert copied_on == ["embresume-vllm-land"], copied_on
    assert sched.stats["items_received"] == 1 and not sched._copying


def test_a_request_that_ends_while_its_item_is_copied_leaves_nothing(producer, consumer_parts):
    """The request ends while the lander still copies its item: the result is released only
    when the copy is done (never while it is read), the region entry is freed, the receive
    pool's blocks are all back."""
    import threading

    from embresume.integrations import _vllm_consumer as C
    tokens = C.ASYNC_LAND_BYTES // (HIDDEN * 2) + 50
    params = producer.encode("enc-gone", [("gone", tokens)])
    sched, ranks = consumer_parts({"landing_bytes": "8MiB"})
    if sched._region is None:
        pytest.skip("receive='worker' has no landing region")
    gate = threading.Event()
    real_submit = C.Lander.submit

    def slow_submit(self, key, dst, src):
        def later():
            gate.wait(20)
            real_submit(self, key, dst, src)
        threading.Thread(target=later, daemon=True).start()
    C.Lander.submit = slow_submit
    try:
        req = make_request("lm-gone", [("gone", tokens)], params=params)
        deadline = time.monotonic() + 30
        while "gone" not in sched._copying:
            assert time.monotonic() < deadline, sched._items
            schedule(sched, [req])
            time.sleep(0.01)
        res = sched._copying["gone"]
        sched.request_finished(req)                       # Release while the copy is out
        assert not res.released                           # the copy may still read it
        gate.set()
        deadline = time.monotonic() + 10
        while sched._copying:
            assert time.monotonic() < deadline
            schedule(sched, [])
            time.sleep(0.01)
    finally:
        C.Lander.submit = real_submit
        gate.set()
    assert res.released and len(sched._region) == 0 and sched._region.pinned() == 0
    assert sched._lang.allocator.free_blocks == sched._lang.layout.num_blocks
    assert not sched.has_pending_push_work()


def test_requests_of_two_items_share_a_two_item_landing_region(producer, consumer_parts):
    """Two requests of two items each on a landing region that holds two: both are served
    through embresume, none recomputed.  Before, when the first item of each landed first,
    neither second item found room (landed items a waiting request needs were never
    evicted) until load_timeout failed them; now the older request's item evicts the
    younger's (transferred again), so a request is never starved by a half-landed other."""
    tokens = 300                                            # 300 x 256 bf16: 150 KiB, 152 KiB in the region
    entry = -(-tokens * HIDDEN * 2 // 4096) * 4096
    for rnd in range(2):
        items_a = [(f"pa{rnd}-1", tokens), (f"pa{rnd}-2", tokens)]
        items_b = [(f"pb{rnd}-1", tokens), (f"pb{rnd}-2", tokens)]
        params = {**producer.encode(f"enc-pa{rnd}", items_a), **producer.encode(f"enc-pb{rnd}", items_b)}
        sched, ranks = consumer_parts({"landing_bytes": 2 * entry, "load_timeout": 15.0})
        if sched._region is None:
            pytest.skip("receive='worker' has no landing region")
        reqs = [make_request(f"lm-pa{rnd}", items_a, params=params), make_request(f"lm-pb{rnd}", items_b, params=params)]
        done, failed = step_until(sched, ranks, reqs, deadline_s=40)
        assert not failed, sched.stats
        assert done[f"lm-pa{rnd}"] == ([h for h, _ in items_a], []) and done[f"lm-pb{rnd}"] == ([h for h, _ in items_b], [])
        for h, n in items_a + items_b:
            assert same_bits(ranks[0][1][h], embedding(h, n)), h
        st = sched.stats
        assert st["recomputes"] == 0 and st["transfer_failures"] == 0, st
        assert 4 <= st["items_received"] <= 6, st              # an eviction costs one transfer again


def test_gauges_show_the_pool_and_region_in_use_and_back_to_idle(producer, consumer_parts):
    """The consumer's scheduler reports levels (vllm:embresume_ec_items_in_flight,
    pool_blocks_used, landing_bytes_used, landing_items_pinned) when they change: up while
    an item transfers or is loaded, back to 0 in flight, 0 pool blocks and 0 pins when its
    request is gone (the landed item stays as a cache).  A dashboard, and the real-engine
    test of a client that disconnects, read these."""
    from embresume.integrations.vllm import GAUGE, EmbresumeECStats
    params = producer.encode("enc-gauge", [("gauge", 100)])
    sched, ranks = consumer_parts({"load_from_pool": False})       # landed into the region
    if sched._region is None:
        pytest.skip("receive='worker' has no landing region")
    req = make_request("lm-gauge", [("gauge", 100)], params=params)
    seen = EmbresumeECStats(data={})
    so, _ = schedule(sched, [req])
    stats = sched.get_ec_connector_stats()
    assert stats is not None and stats.data[GAUGE + "items_in_flight"] == 1, stats.data
    seen.aggregate(stats)
    done, failed = step_until(sched, ranks, [req], deadline_s=30)    # finishes the request too
    assert not failed
    stats = sched.get_ec_connector_stats()
    seen.aggregate(stats)
    levels = {k[len(GAUGE):]: v for k, v in seen.data.items() if k.startswith(GAUGE)}
    assert levels == {"items_in_flight": 0, "pool_blocks_used": 0, "landing_items_pinned": 0,
                      "landing_bytes_used": sched._region.used, "pool_items_held": 0}, levels
    assert sched._region.used > 0                        # landed, kept for a later request
    assert not seen.is_empty()
    # unchanged levels are not reported again
    assert sched.get_ec_connector_stats() is None


def test_engine_timeouts_default_to_what_a_busy_engine_needs():
    """Inside vLLM the endpoints' threads share the engine's processes, which keep them off
    the interpreter for seconds on a busy host: the connector's defaults are 15 s of peer
    silence, a 20 s handshake and a 15 s failover (the library's: 3 s, 10 s; the connector's
    failover was 5 s, and 8 s of a stopped producer failed the docs' pair over twice:
    tests/test_vllm_serving.py::test_docs_commands).  An option of the same name wins."""
    from embresume.config import Config
    from embresume.integrations._vllm_roles import Options

    base = {k: v for k, v in BASE_EXTRA.items() if k not in ("peer_timeout", "handshake_timeout", "failover_timeout")}
    opts = Options(vllm_config("ec_consumer", base), False, False, adapter.OWN_KEYS)
    assert (opts.config.peer_timeout, opts.config.handshake_timeout, opts.failover) == (15.0, 20.0, 15.0)
    assert (Config().peer_timeout, Config().handshake_timeout) == (3.0, 10.0)      # the library's own
    mine = dict(base, peer_timeout=4.0, handshake_timeout=6.0, failover_timeout=2.0)
    opts = Options(vllm_config("ec_consumer", mine), False, False, adapter.OWN_KEYS)
    assert (opts.config.peer_timeout, opts.config.handshake_timeout, opts.failover) == (4.0, 6.0, 2.0)


def test_the_producer_writes_an_item_in_one_piece_inside_vllm():
    """The consumer reads a one-chunk item straight from its receive pool, so the
    producer's pieces and PROGRESS reports (Config.pipeline_bytes) only wake its threads:
    inside vLLM the producer writes a chunk in one piece unless pipeline_bytes is set."""
    from embresume.config import Config
    from embresume.integrations._vllm_roles import Options
    from embresume.pieces import pieces
    from embresume.planner import ChunkPlan
    from embresume.blocks import BlockLayout

    base = {k: v for k, v in BASE_EXTRA.items() if k != "pipeline_bytes"}
    opts = Options(vllm_config("ec_producer", base), True, True, adapter.OWN_KEYS)
    assert opts.config.pipeline_bytes == 0 and Config().pipeline_bytes == 8 << 20
    layout = BlockLayout(64, 64, 3584, torch.bfloat16, 16)
    plan = ChunkPlan(0, 37, tuple(range(37)), 2340, 2340, False)       # a 16.5 MB item
    assert len(pieces(plan, layout, Config().pipeline_bytes, True)) == 4
    assert pieces(plan, layout, opts.config.pipeline_bytes, True) == [plan]
    opts = Options(vllm_config("ec_producer", dict(base, pipeline_bytes=4 << 20)), True, True, adapter.OWN_KEYS)
    assert opts.config.pipeline_bytes == 4 << 20


def test_a_published_item_outlives_the_producers_request_timeout(consumer_parts):
    """The producer keeps an item published past its request_timeout (registered again while
    it is held, within producer_max_bytes), so a request that waited in a consumer's queue
    longer still gets it through embresume.  Before: the producer let go of it after
    request_timeout and the consumer was answered NOT_PUBLISHED (the benchmark's 101 items,
    encoded 100 s before the consumer asked, were all recomputed)."""
    p = Producer({"request_timeout": 1.0})
    try:
        params = p.encode("enc-late", [("late", 24)])
        time.sleep(3.5)                                   # three of the producer's request_timeouts
        sched, ranks = consumer_parts({"encoder_addresses": [p.address]})
        done, failed = step_until(sched, ranks, [make_request("lm-late", [("late", 24)], params=params)],
                                  deadline_s=30)
        assert not failed and done["lm-late"] == (["late"], [])
        assert same_bits(ranks[0][1]["late"], embedding("late", 24))
        stats = sched.stats if sched._lang is not None else ranks[0][0].stats
        assert stats["items_received"] == 1 and stats["recomputes"] == 0 and stats["transfer_failures"] == 0
    finally:
        p.stop()
