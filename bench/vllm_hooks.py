"""The vLLM connector's cost on vLLM's scheduler thread (issue 27, item 3).

    python -m embresume.bench.vllm_hooks [--requests 1,64,256] [--open 0,200] [--steps 200]
                                         [--quick] [--json OUT] [--profile R,T]

(from a checkout ``python -m bench.vllm_hooks`` works too).  Needs vLLM's EC
connector interface (the ``.venv-wheel`` environment of the tests, or a real
vLLM).  Everything runs in this process, on vLLM's real classes:
``ECConnectorFactory`` builds the connectors from a real ``VllmConfig``,
requests are real ``Request`` objects (``MultiModalFeatureSpec``,
``PlaceholderRange``, ``ec_transfer_params`` through ``SamplingParams``),
outputs are real ``SchedulerOutput`` / ``ECConnectorOutput``.  The producer is
an ``EmbresumeECConnector`` producer (worker + scheduler) in this process; the
consumer names it in ``encoder_addresses``.

**What one scheduler step calls** (vllm/v1/core/sched/scheduler.py, 0.33.0;
the loop below makes these calls in this order and times each one with
``time.perf_counter_ns``):

* ``schedule()``, running requests (line 829): ``ensure_cache_available(req,
  num_computed_tokens - num_output_placeholders)`` for *every* running request
  that has ``mm_features``, decoding or not.  A decoding request's items are
  all computed, so the connector has no item to look at, but the call is
  made.  No ``has_cache_item``: ``_try_schedule_encoder_inputs`` asks only
  about items inside the step's token window, and a decode token is no
  placeholder.
* ``schedule()``, waiting requests (``_ec_transfer_pending``, lines 1247 /
  1271): ``ensure_cache_available(req, 0)`` for each waiting request; one
  whose item is in flight is skipped (``False``) and asked again next step.
  vLLM walks the waiting queue while fewer than ``max_num_seqs`` requests run;
  the model takes that case (``max_num_seqs`` above R), the one where all T
  waiting requests are asked every step.
* one request admitted per step (``--admit``), its item landed already:
  ``ensure_cache_available`` (True) -> ``has_cache_item`` (True, line 2190)
  -> ``update_state_after_alloc`` (line 2013).
* ``build_connector_meta`` once (line 1769).
* ``update_from_output()``: ``take_unavailable_requests`` (line 2562), then
  ``update_connector_output`` (line 2586) with the workers' report of this
  step's loads (an ``EmbresumeECWorkerMetadata`` naming the admitted item's
  load id, as the landing worker reports it).
* ``request_finished`` for one request (line 3048): the admitted one, so that
  R stays constant (a real step finishes about as many as it admits).

Not modelled: ``update_state_after_free`` (only when an item's placeholders
are computed, once per item, not per step) and ``has_pending_push_work``
(read only when no request is left).

**Scenario per cell (R running, T open)**: a consumer scheduler connector
(``receive="scheduler"``, hidden 3584 bf16); R running requests, each with one
image item of 16 tokens that went through the connector (requested, received
from the producer, landed, reported present, loaded, reported back) and is
now decoding; T waiting requests whose item the producer never publishes, so
their transfers stay open (``failover_timeout``, ``load_timeout`` and
``request_timeout`` of 3600 s).  One consumer per T; the R values reuse its
first R running requests.

**Baselines, same run, same call sequence and counts**:

* ``example``: vLLM's ``ECExampleConnector`` (consumer, storage on a temp
  dir), built by the same factory: what vLLM's own connector costs per step;
* ``null``: an object whose methods return at once: the Python call floor.

**Landing copy**: items of 2 MB (292 tokens) and 16 MB (2340 tokens) at
width 3584 bf16 are sent by the producer and land through the consumer's
hooks (a request each, its hooks called every 0.5 ms until the item is
available).  Timed on the scheduler thread: every call of the landing
scheduler's ``_land`` and, where a lander thread makes the copy, ``_copied``
(whichever of the two the role has), summed per item ("land"), and the
longest single hook call while the item came in; also the time from the
request's first ``ensure_cache_available`` to the one that returned True
(the transfer included).  Beside it, in the same run, interleaved: a
``torch`` ``copy_`` of the same bytes into a pre-allocated tensor, with
torch's threads and with one thread.

``--profile R,T`` runs that cell once more under cProfile and prints the
functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch

from .bench_common import free_port, machine_description, percentile

NS = time.perf_counter_ns
SCHEMA = 1
HIDDEN = 3584
DTYPE = torch.bfloat16
RUN_TOKENS = 16               # the running requests' items (one block each)
OPEN_TOKENS = 16              # the open transfers' items
ADMIT_ITEMS = 4               # landed items the admitted requests cycle through
LAND_SIZES = ((0.11, 16), (2, 292), (16, 2340))   # (MB, tokens) at 3584 bf16; the first: the fixed cost
LAND_METHODS = ("_land", "_copied")   # the landing scheduler's landing work, where it has them
ASK_EVERY_S = 0.0005          # the landing measurement's hook cadence (a waiting request asked again)
GOAL_US = 1000.0              # issue 27: at most 1 ms of hook time per step ...
GOAL_CELL = (256, 200)        # ... at 256 running requests and 200 open transfers
LONG = 3600.0
CONNECTOR = "EmbresumeECConnector"
MODULE = "embresume.integrations.vllm"
BASE_EXTRA = {"hidden_size": HIDDEN, "dtype": "bf16", "device": "cpu", "block_size": 16,
              "default_allocate_tokens": 64, "request_timeout": LONG, "handshake_timeout": 10.0,
               "peer_timeout": 30.0}

PROFILES = {
    "full": {"requests": (1, 64, 256), "open": (0, 200), "steps": 200, "warmup": 20, "cell_seconds": 22.0,
             "land_repeats": 16},
    "quick": {"requests": (1, 8), "open": (0, 8), "steps": 20, "warmup": 3, "cell_seconds": 10.0,
              "land_repeats": 2},
}

log = logging.getLogger("embresume.bench.vllm_hooks")


def _vllm():
    """vLLM's classes (ImportError with the reason where the interface is missing)."""
    from vllm.config import DeviceConfig, ECTransferConfig, ParallelConfig, VllmConfig
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
    from vllm.multimodal.inputs import (MultiModalFeatureSpec, MultiModalFieldElem, MultiModalKwargsItem,
                                        MultiModalSharedField, PlaceholderRange)
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request
    return dict(DeviceConfig=DeviceConfig, ECTransferConfig=ECTransferConfig, ParallelConfig=ParallelConfig,
                VllmConfig=VllmConfig, ECConnectorRole=ECConnectorRole, ECConnectorFactory=ECConnectorFactory,
                MultiModalFeatureSpec=MultiModalFeatureSpec, MultiModalFieldElem=MultiModalFieldElem,
                MultiModalKwargsItem=MultiModalKwargsItem, MultiModalSharedField=MultiModalSharedField,
                PlaceholderRange=PlaceholderRange, SamplingParams=SamplingParams,
                SchedulerOutput=SchedulerOutput, ECConnectorOutput=ECConnectorOutput, Request=Request)


V: dict = {}


# ------------------------------------------------------------------ vLLM objects
def vllm_config(role: str, extra: dict, connector: str = CONNECTOR, module: Optional[str] = MODULE):
    """A real VllmConfig without a model (as tests/test_integration_vllm.py builds it): the
    producer's ECTransferConfig is attached after construction (VllmConfig refuses an
    ec_producer without a multimodal model config); the connector only reads it."""
    kw = dict(ec_connector=connector, ec_role=role, ec_connector_extra_config=dict(extra))
    if module:
        kw["ec_connector_module_path"] = module
    ec = V["ECTransferConfig"](**kw)
    cfg = V["VllmConfig"](device_config=V["DeviceConfig"](device="cpu"),
                          parallel_config=V["ParallelConfig"](tensor_parallel_size=1),
                          ec_transfer_config=None if ec.is_encode_only else ec)
    cfg.ec_transfer_config = ec
    return cfg


def make_request(rid: str, items, params=None):
    """items: [(mm_hash, num_embeds)], placeholders one after another after one text token;
    the media is placeholder metadata only (what vLLM 0.33 hands EC consumers)."""
    feats, pos = [], 1
    for h, n in items:
        data = V["MultiModalKwargsItem"]({"pixel_values": V["MultiModalFieldElem"](
            data=None, field=V["MultiModalSharedField"](batch_size=1))})
        feats.append(V["MultiModalFeatureSpec"](data=data, modality="image", identifier=h,
                                                mm_position=V["PlaceholderRange"](offset=pos, length=n)))
        pos += n
    extra_args = {"ec_transfer_params": params} if params is not None else None
    return V["Request"](rid, [0] * (pos + 1), V["SamplingParams"](max_tokens=1, extra_args=extra_args), None,
                        mm_features=feats)


def _worker_meta(load_ids):
    from embresume.integrations.vllm import EmbresumeECWorkerMetadata
    return V["ECConnectorOutput"](ec_connector_worker_meta=EmbresumeECWorkerMetadata(loaded=list(load_ids)))


class NullConnector:
    """The call floor: every hook returns at once."""

    def ensure_cache_available(self, request, num_computed_tokens):
        return True

    def has_cache_item(self, identifier):
        return True

    def update_state_after_alloc(self, request, index):
        return None

    def build_connector_meta(self, scheduler_output):
        return None

    def take_unavailable_requests(self):
        return set()

    def update_connector_output(self, connector_output):
        return None

    def request_finished(self, request):
        return False, None

    def shutdown(self):
        return None


# ------------------------------------------------------------------ producer
class Producer:
    """An EmbresumeECConnector producer (worker: encoder endpoint + publisher; scheduler:
    ec_transfer_params) in this process."""

    def __init__(self):
        from embresume.integrations.vllm import EmbresumeECConnector
        R = V["ECConnectorRole"]
        self.address = f"tcp://127.0.0.1:{free_port()}"
        cfg = vllm_config("ec_producer", dict(BASE_EXTRA, encoder_address=self.address,
                                              producer_max_bytes=1 << 30, pool_blocks=64))
        self.worker = EmbresumeECConnector(cfg, R.WORKER)
        self.sched = EmbresumeECConnector(cfg, R.SCHEDULER)
        self._published = 0

    def params(self, items) -> dict:
        """ec_transfer_params of a request with these items, from the producer's request_finished."""
        _, params = self.sched.request_finished(make_request("enc-" + items[0][0], items))
        return params

    def publish(self, tensors: dict, timeout: float = 60.0) -> None:
        for h, t in tensors.items():
            self.worker.save_caches({h: t}, h)
        self._published += len(tensors)
        deadline = time.monotonic() + timeout
        while self.worker.stats["items_published"] < self._published:
            if time.monotonic() > deadline:
                raise RuntimeError(f"producer published {self.worker.stats['items_published']} of "
                                   f"{self._published} items in {timeout:.0f} s")
            time.sleep(0.005)

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()


def _consumer(producer: Producer, extra: dict):
    cfg = vllm_config("ec_consumer", {**BASE_EXTRA, "receive": "scheduler", "encoder_addresses": [producer.address],
                                      "failover_timeout": LONG, "load_timeout": LONG, "max_attempts": 1,
                                      "on_failure": "fail", **extra})
    return V["ECConnectorFactory"].create_connector(cfg, V["ECConnectorRole"].SCHEDULER)


def _example_consumer(path: str):
    cfg = vllm_config("ec_consumer", {"shared_storage_path": path}, connector="ECExampleConnector", module=None)
    return V["ECConnectorFactory"].create_connector(cfg, V["ECConnectorRole"].SCHEDULER)


def _bring_in(sched, requests, timeout: float = 120.0) -> None:
    """Run ``requests`` (items published) through the connector the way vLLM's steps do
    until every one is scheduled: requested, landed, reported present, allocated, loaded
    and reported back."""
    pending = list(requests)
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} items never landed: "
                               f"{[(r.request_id, sched.tracker.phase(r.mm_features[0].identifier)) for r in pending[:3]]}")
        admitted = []
        for req in pending:
            if sched.ensure_cache_available(req, 0):
                for i, f in enumerate(req.mm_features):
                    sched.has_cache_item(f.identifier)
                    sched.update_state_after_alloc(req, i)
                admitted.append(req)
        so = V["SchedulerOutput"].make_empty()
        meta = sched.build_connector_meta(so)
        sched.take_unavailable_requests()
        sched.update_connector_output(_worker_meta([v[0] for v in getattr(meta, "landed", {}).values()]))
        for req in admitted:
            pending.remove(req)
        if pending:
            time.sleep(0.002)


# ------------------------------------------------------------------ the step loop
class Cell:
    """The requests of one (R, T) cell and the step loop over them."""

    def __init__(self, running, waiting, admit, admit_items):
        self.running = running          # [(request, num_computed_tokens)]
        self.waiting = waiting          # [request]
        self.admit = admit
        self.admit_items = admit_items  # [(mm_hash, tokens, params)]
        self.n = 0
        self.hits = 0                   # admitted items has_cache_item reported present

    def calls_per_step(self) -> dict:
        return {"ensure_cache_available": len(self.running) + len(self.waiting) + self.admit,
                "has_cache_item": self.admit, "update_state_after_alloc": self.admit,
                "build_connector_meta": 1, "take_unavailable_requests": 1, "update_connector_output": 1,
                "request_finished": self.admit}

    def step(self, c, per_hook: Optional[dict] = None) -> int:
        """One scheduler step's connector calls on ``c``; returns the hook time (ns)."""
        ens = hci = alloc = 0
        for req, computed in self.running:                  # schedule(): RUNNING
            t0 = NS()
            c.ensure_cache_available(req, computed)
            t1 = NS()
            ens += t1 - t0
        for req in self.waiting:                            # schedule(): WAITING, in flight
            t0 = NS()
            c.ensure_cache_available(req, 0)
            t1 = NS()
            ens += t1 - t0
        admitted = []
        for _ in range(self.admit):                         # a new request whose item landed
            h, tokens, params = self.admit_items[self.n % len(self.admit_items)]
            self.n += 1
            req = make_request(f"adm-{self.n}", [(h, tokens)], params)
            t0 = NS()
            ok = c.ensure_cache_available(req, 0)
            t1 = NS()
            hit = ok and c.has_cache_item(h)
            t2 = NS()
            if ok:
                c.update_state_after_alloc(req, 0)
            t3 = NS()
            ens += t1 - t0
            hci += t2 - t1
            alloc += t3 - t2
            self.hits += bool(hit)
            admitted.append((req, hit))
        so = V["SchedulerOutput"].make_empty()
        t0 = NS()
        meta = c.build_connector_meta(so)
        t1 = NS()
        landed = getattr(meta, "landed", None) or {}
        loads = [v[0] for v in landed.values()]
        out = _worker_meta(loads) if isinstance(c, _embresume_class()) else V["ECConnectorOutput"]()
        t2 = NS()
        c.take_unavailable_requests()
        t3 = NS()
        c.update_connector_output(out)
        t4 = NS()
        for req, _ in admitted:
            c.request_finished(req)
        t5 = NS()
        t = ens + hci + alloc + (t1 - t0) + (t4 - t2) + (t5 - t4)
        if per_hook is not None:
            for k, v in (("ensure_cache_available", ens), ("has_cache_item", hci), ("update_state_after_alloc", alloc),
                         ("build_connector_meta", t1 - t0), ("take_unavailable_requests", t3 - t2),
                         ("update_connector_output", t4 - t3), ("request_finished", t5 - t4)):
                per_hook[k] = per_hook.get(k, 0) + v
        return t


def _embresume_class():
    from embresume.integrations.vllm import EmbresumeECConnector
    return EmbresumeECConnector


def _stats_us(ns: list) -> dict:
    us = [x / 1e3 for x in ns]
    return {"n": len(us), "p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "mean_us": statistics.fmean(us) if us else float("nan"), "min_us": min(us) if us else float("nan"),
            "max_us": max(us) if us else float("nan")}


def _measure(cell: Cell, c, steps: int, warmup: int, cell_seconds: float) -> dict:
    end = time.monotonic() + min(3.0, cell_seconds / 5)
    cell.n = cell.hits = 0
    for _ in range(warmup):
        cell.step(c)
        if time.monotonic() > end:
            break
    per_hook: dict = {}
    samples = []
    end = time.monotonic() + cell_seconds
    for _ in range(steps):
        samples.append(cell.step(c, per_hook))
        if time.monotonic() > end:
            break
    r = _stats_us(samples)
    r["admit_hit_rate"] = cell.hits / max(1, cell.n)
    r["per_hook_mean_us"] = {k: v / 1e3 / len(samples) for k, v in per_hook.items()}
    return r


# ------------------------------------------------------------------ scenario
def _hooks(producer: Producer, prof: dict, admit: int, say, profile_cell=None) -> list:
    rmax = max(prof["requests"])
    tensor = torch.zeros(RUN_TOKENS, HIDDEN, dtype=DTYPE)
    cells = []
    tmp = tempfile.mkdtemp(prefix="embr-vllm-hooks-")
    try:
        for T in prof["open"]:
            tag = f"t{T}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
            # landing room: every running item, the admitted ones, spare
            landing = (rmax + ADMIT_ITEMS + 16) * RUN_TOKENS * HIDDEN * 2
            pool = rmax + ADMIT_ITEMS + T + 64
            # load_from_pool off: the cells time the hooks with items landed in the region and
            # kept there as a cache, asked for again and again (an item held in the pool is let
            # go once loaded; vLLM's own encoder cache then holds it, which this bench has not)
            c = _consumer(producer, {"landing_bytes": max(landing, 8 << 20), "pool_blocks": pool,
                                     "load_from_pool": False})
            try:
                say(f"T={T}: bringing in {rmax} running items and {ADMIT_ITEMS} admit items")
                run_h = [f"run-{tag}-{i}" for i in range(rmax)]
                adm_h = [f"adm-{tag}-{i}" for i in range(ADMIT_ITEMS)]
                producer.publish({h: tensor for h in run_h + adm_h})
                running = [make_request(f"r-{h}", [(h, RUN_TOKENS)], producer.params([(h, RUN_TOKENS)]))
                           for h in run_h]
                admit_items = [(h, RUN_TOKENS, producer.params([(h, RUN_TOKENS)])) for h in adm_h]
                adm_reqs = [make_request(f"a0-{h}", [(h, t)], p) for h, t, p in admit_items]
                _bring_in(c, running + adm_reqs)
                for req in adm_reqs:                 # landed, loaded, finished: in the region for later
                    c.request_finished(req)
                waiting = []
                if T:
                    say(f"T={T}: opening {T} transfers the producer never serves")
                    for i in range(T):
                        h = f"open-{tag}-{i}"
                        req = make_request(f"w-{h}", [(h, OPEN_TOKENS)], producer.params([(h, OPEN_TOKENS)]))
                        if c.ensure_cache_available(req, 0):
                            raise RuntimeError(f"open item {h} reported available")
                        waiting.append(req)
                    c.build_connector_meta(V["SchedulerOutput"].make_empty())
                    deadline = time.monotonic() + 60
                    while True:                     # every transfer started (not pending)
                        phases = [c.tracker.phase(r.mm_features[0].identifier) for r in waiting] \
                            if hasattr(c, "tracker") else []
                        if all(getattr(p, "value", p) == "transferring" for p in phases):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"open transfers not all started: {phases[:5]}")
                        for r in waiting:
                            c.ensure_cache_available(r, 0)
                        time.sleep(0.01)
                for R in prof["requests"]:
                    run = [(req, req.num_tokens) for req in running[:R]]
                    cell = Cell(run, waiting, admit, admit_items)
                    ex = _example_consumer(tmp)
                    rows = {}
                    for name, conn in (("embresume", c), ("example", ex), ("null", NullConnector())):
                        rows[name] = _measure(cell, conn, prof["steps"], prof["warmup"], prof["cell_seconds"])
                    ex.shutdown()
                    rows["calls_per_step"] = cell.calls_per_step()
                    rows["requests"], rows["open"] = R, T
                    if hasattr(c, "tracker"):
                        rows["open_transfers_seen"] = sum(
                            1 for it in c.tracker.items.values() if getattr(it.phase, "value", "") == "transferring")
                    rows["x_null_p50"] = rows["embresume"]["p50_us"] / max(rows["null"]["p50_us"], 1e-9)
                    rows["x_example_p50"] = rows["embresume"]["p50_us"] / max(rows["example"]["p50_us"], 1e-9)
                    say(f"R={R} T={T}: embresume p50 {rows['embresume']['p50_us']:.0f} us/step "
                        f"(example {rows['example']['p50_us']:.0f}, null {rows['null']['p50_us']:.0f}; "
                        f"{rows['embresume']['n']} steps)")
                    if profile_cell == (R, T):
                        rows["profile"] = _profile(cell, c, min(prof["steps"], 10))
                    cells.append(rows)
                for req in waiting:
                    c.request_finished(req)
            finally:
                c.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cells


def _profile(cell: Cell, c, steps: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        cell.step(c)
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    s.write(f"cProfile, {steps} steps\n")
    st.sort_stats("tottime").print_stats(18)
    return s.getvalue()


def _landing(producer: Producer, repeats: int, say) -> list:
    """Per size: LandingScheduler._land per item, the hook call that landed it, and a torch
    copy_ of the same bytes, interleaved."""
    rows = []
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"
    big = max(t for _, t in LAND_SIZES)
    # the connector's default region (512 MiB): as in serving, the items land on pages the
    # region has not held an item in before (a region of a few items would reuse warm pages)
    c = _consumer(producer, {"pool_blocks": 2 * (big // 16 + 2) + 16})
    try:
        impl = getattr(c, "_impl", c)
        land_ns: list = []
        # the landing work on the scheduler thread: _land (allocates, copies or hands the copy
        # to a lander thread) and, where a lander copies, _copied (the copy's end, on a poll)
        wrapped = []
        # the fixed cost, step by step: when the request went out (_start returned) and when
        # the item counted as landed (_landed), per item
        stamps: dict = {}
        for name in ("_start", "_landed"):
            orig = getattr(impl, name, None)
            if orig is None:
                continue

            def stamped(*args, _orig=orig, _name=name, **kw):
                try:
                    return _orig(*args, **kw)
                finally:
                    stamps.setdefault(_name, NS())
            setattr(impl, name, stamped)
        for name in LAND_METHODS:
            orig = getattr(impl, name, None)
            if orig is None:
                continue
            wrapped.append(name)

            def timed(*args, _orig=orig, **kw):
                t0 = NS()
                try:
                    return _orig(*args, **kw)
                finally:
                    land_ns.append(NS() - t0)
            setattr(impl, name, timed)
        for mb, tokens in LAND_SIZES:
            src = torch.randn(tokens, HIDDEN).to(DTYPE)
            dst = torch.empty_like(src)
            dst.copy_(src)                                    # fault the destination in
            hashes = [f"land-{tag}-{mb}-{i}" for i in range(repeats + 1)]
            producer.publish({h: src for h in hashes})
            land, hook, copy, copy1, avail = [], [], [], [], []
            sent, transfer, after = [], [], []
            for i, h in enumerate(hashes):
                req = make_request(f"l-{h}", [(h, tokens)], producer.params([(h, tokens)]))
                del land_ns[:]
                stamps.clear()
                hook_max = 0
                deadline = time.monotonic() + 60
                t_req = NS()
                while True:
                    t0 = NS()
                    ok = c.ensure_cache_available(req, 0)
                    hook_max = max(hook_max, NS() - t0)
                    if ok:
                        t_avail = NS()
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{mb} MB item never landed")
                    time.sleep(ASK_EVERY_S)
                c.build_connector_meta(V["SchedulerOutput"].make_empty())
                c.request_finished(req)
                t0 = NS()
                dst.copy_(src)
                t1 = NS()
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    t2 = NS()
                    dst.copy_(src)
                    t3 = NS()
                finally:
                    torch.set_num_threads(threads)
                if i == 0:
                    continue                                  # warm-up
                copy.append(t1 - t0)
                copy1.append(t3 - t2)
                avail.append(t_avail - t_req)
                if "_start" in stamps and "_landed" in stamps:
                    sent.append(stamps["_start"] - t_req)
                    transfer.append(stamps["_landed"] - stamps["_start"])
                    after.append(t_avail - stamps["_landed"])
                hook.append(hook_max)
                if land_ns:
                    land.append(sum(land_ns))
            row = {"mb": mb, "tokens": tokens, "bytes": src.numel() * src.element_size(),
                   "torch_threads": torch.get_num_threads(), "land_methods": wrapped,
                   "request_to_available": _stats_us(avail),
                   # its steps: request to sent (the hook call that asked), sent to landed
                   # (the transfer, the hook call that took it up, the landing copy) and landed
                   # to available (the next hook call, ASK_EVERY_S later at most)
                   "request_to_sent": _stats_us(sent) if sent else None,
                   "sent_to_landed": _stats_us(transfer) if transfer else None,
                   "landed_to_available": _stats_us(after) if after else None,
                   "memcpy": _stats_us(copy), "memcpy_1thread": _stats_us(copy1), "landing_hook_call": _stats_us(hook),
                   "land": _stats_us(land) if land else None}
            ref = row["land"]["p50_us"] if land else row["landing_hook_call"]["p50_us"]
            row["x_memcpy_p50"] = ref / max(row["memcpy"]["p50_us"], 1e-9)
            row["x_memcpy_1thread_p50"] = ref / max(row["memcpy_1thread"]["p50_us"], 1e-9)
            if sent:
                say(f"fixed cost {mb} MB: request->available p50 {row['request_to_available']['p50_us']:.0f} us = "
                    f"request->sent {row['request_to_sent']['p50_us']:.0f} + sent->landed "
                    f"{row['sent_to_landed']['p50_us']:.0f} + landed->available "
                    f"{row['landed_to_available']['p50_us']:.0f} (p50 each; hook calls every "
                    f"{1e3 * ASK_EVERY_S:.1f} ms)")
            say(f"landing {mb} MB: land p50 {row['land']['p50_us'] if land else float('nan'):.0f} us, "
                f"hook call p50 {row['landing_hook_call']['p50_us']:.0f} us, "
                f"memcpy p50 {row['memcpy']['p50_us']:.0f} us (1 thread {row['memcpy_1thread']['p50_us']:.0f} us)")
            rows.append(row)
    finally:
        c.shutdown()
    return rows


def run_hooks(requests=None, open_=None, steps=None, quick: bool = False, admit: int = 1, land: bool = True,
              profile_cell=None, progress=None) -> dict:
    V.update(_vllm())
    prof = dict(PROFILES["quick" if quick else "full"])
    if requests:
        prof["requests"] = tuple(requests)
    if open_ is not None:
        prof["open"] = tuple(open_)
    if steps:
        prof["steps"] = steps
    say = progress or (lambda s: None)
    t0 = time.monotonic()
    r = {"schema": SCHEMA, "bench": "vllm_hooks", "profile": "quick" if quick else "full",
         "machine": machine_description(), "hidden": HIDDEN, "dtype": "bf16",
         "loadavg_start": os.getloadavg(), "config": {**prof, "admit": admit}}
    try:
        import vllm
        r["machine"]["vllm"] = getattr(vllm, "__version__", None)
    except Exception:
        pass
    producer = Producer()
    try:
        r["cells"] = _hooks(producer, prof, admit, say, profile_cell)
        r["landing"] = _landing(producer, prof["land_repeats"], say) if land else []
    finally:
        producer.close()
    r["loadavg_end"] = os.getloadavg()
    r["wall_s"] = time.monotonic() - t0
    goal = next((c for c in r["cells"] if (c["requests"], c["open"]) == GOAL_CELL), None)
    if goal is not None:
        r["goal"] = {"goal": f"hook time per step <= {GOAL_US:.0f} us at R={GOAL_CELL[0]}, T={GOAL_CELL[1]}",
                     "p50_us": goal["embresume"]["p50_us"], "p99_us": goal["embresume"]["p99_us"],
                     "x_goal_p50": goal["embresume"]["p50_us"] / GOAL_US,
                     "pass": goal["embresume"]["p99_us"] <= GOAL_US}
    return r


# ------------------------------------------------------------------ output
def _f(x, nd=0) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{nd}f}"


SHORT = {"ensure_cache_available": "ensure", "has_cache_item": "has_item", "update_state_after_alloc": "alloc",
         "build_connector_meta": "build_meta", "take_unavailable_requests": "take_unavail",
         "update_connector_output": "update_out", "request_finished": "finished"}


def table_rows(r: dict):
    head = ["R", "T", "embresume p50", "p99", "mean", "example p50", "null p50", "x null", "steps",
            "ensure/step", "top hook (mean us)"]
    rows = []
    for c in r.get("cells", []):
        e = c["embresume"]
        top = max(e["per_hook_mean_us"].items(), key=lambda kv: kv[1]) if e.get("per_hook_mean_us") else ("-", 0)
        rows.append([str(c["requests"]), str(c["open"]), _f(e["p50_us"]), _f(e["p99_us"]), _f(e["mean_us"]),
                     _f(c["example"]["p50_us"], 1), _f(c["null"]["p50_us"], 1), _f(c["x_null_p50"]),
                     str(e["n"]), str(c["calls_per_step"]["ensure_cache_available"]),
                     f"{SHORT.get(top[0], top[0])} {_f(top[1])}"])
    lhead = ["item", "tokens", "land p50 us", "land p99", "land min", "longest hook call p50", "memcpy p50",
             "memcpy min", "1-thread memcpy p50", "x memcpy p50", "request->available p50"]
    lrows = []
    for l in r.get("landing", []):
        lrows.append([f"{l['mb']} MB", str(l["tokens"]), _f(l["land"]["p50_us"]) if l["land"] else "-",
                      _f(l["land"]["p99_us"]) if l["land"] else "-", _f(l["land"]["min_us"]) if l["land"] else "-",
                      _f(l["landing_hook_call"]["p50_us"]), _f(l["memcpy"]["p50_us"]), _f(l["memcpy"]["min_us"]),
                      _f(l["memcpy_1thread"]["p50_us"]), _f(l["x_memcpy_p50"], 2),
                      _f(l.get("request_to_available", {}).get("p50_us"))])
    return (head, rows), (lhead, lrows)


def format_table(r: dict) -> str:
    (h, rows), (lh, lrows) = table_rows(r)
    out = []
    for title, hh, rr in (("hook time per scheduler step (us)", h, rows), ("landing copy on the scheduler thread", lh, lrows)):
        w = [max(len(x) for x in col) for col in zip(hh, *rr)] if rr else [len(x) for x in hh]
        out.append(title)
        out.append("  ".join(x.rjust(n) for x, n in zip(hh, w)))
        out += ["  ".join(x.rjust(n) for x, n in zip(row, w)) for row in rr]
        out.append("")
    g = r.get("goal")
    if g:
        out.append(f"{'PASS' if g['pass'] else 'MISS'} {g['goal']}: p50 {_f(g['p50_us'])} us, p99 {_f(g['p99_us'])} us "
                   f"({g['x_goal_p50']:.1f}x the goal)")
    m = r.get("machine", {})
    out.append(f"{m.get('cpu_model')}, {m.get('usable_cores')} cores, vllm {m.get('vllm')}, torch {m.get('torch')}; "
               f"load average {r['loadavg_start'][0]:.2f} at start, {r['loadavg_end'][0]:.2f} at end; "
               f"wall {r.get('wall_s', 0):.0f} s")
    return "\n".join(out)


def print_table(r: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(r))
        return
    (h, rows), (lh, lrows) = table_rows(r)
    con = Console(width=max(150, shutil.get_terminal_size((150, 24)).columns))
    for title, hh, rr in (("hook time per scheduler step (us)", h, rows),
                          ("landing copy on the scheduler thread", lh, lrows)):
        t = Table(title=title)
        for x in hh:
            t.add_column(x, justify="right")
        for row in rr:
            t.add_row(*row)
        con.print(t)
    print("\n".join(format_table(r).splitlines()[-2:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m embresume.bench.vllm_hooks", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", help="running multimodal requests per cell, comma-separated (default 1,64,256)")
    p.add_argument("--open", help="open transfers per cell, comma-separated (default 0,200)")
    p.add_argument("--steps", type=int, help="timed steps per cell (default 200; a cell stops at 40 s)")
    p.add_argument("--admit", type=int, default=1, help="requests admitted (and finished) per step (default 1)")
    p.add_argument("--quick", action="store_true", help="small cells, few steps (for tests)")
    p.add_argument("--no-landing", action="store_true", help="skip the landing-copy measurement")
    p.add_argument("--profile", help="R,T: run that cell once more under cProfile and print the top functions")
    p.add_argument("--json", help="write the full result to this file")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("embresume").setLevel(logging.ERROR)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    prof_cell = tuple(ints(a.profile)) if a.profile else None
    if prof_cell is not None and len(prof_cell) != 2:
        p.error("--profile takes R,T")
    try:
        V.update(_vllm())
    except Exception as e:
        print(f"vLLM's EC connector interface does not import here ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    prog = None if a.quiet else (lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True))
    r = run_hooks(ints(a.requests) if a.requests else None, ints(a.open) if a.open is not None else None, a.steps,
                  quick=a.quick, admit=a.admit, land=not a.no_landing, profile_cell=prof_cell, progress=prog)
    print_table(r)
    for c in r["cells"]:
        if c.get("profile"):
            print(f"\nprofile of R={c['requests']}, T={c['open']}:\n{c['profile']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    from embresume.bench.vllm_hooks import main as _main
    sys.exit(_main())
