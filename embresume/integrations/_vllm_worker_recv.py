"""The consumer's roles for ``receive="worker"``: every worker receives its own copy of
each item into its own pool (CUDA IPC on GPUs); the scheduler names the transfers and
installs what every rank staged.  Needs vLLM's V2 model runner."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..errors import EmbResumeError, TransferFailed
from ..status import Status
from ._common import describe, unpinned
from ._vllm_base import EmbresumeECMetadata, EmbresumeECWorkerMetadata, LoadSpec, Role, discard, uncomputed
from ._vllm_consumer import _ConsumerScheduler

log = logging.getLogger("embresume.integrations.vllm")


# ---------------------------------------------------------------- receive="worker"
PENDING, LOADING, READY, FAILED = "pending", "loading", "ready", "failed"


@dataclass
class _StagedItem:
    mm_hash: str
    encoder: str
    num_embeds: int
    state: str = PENDING
    requests: set = field(default_factory=set)
    started: float = 0.0
    deadline: float = 0.0
    reason: str = ""


class WorkerRecvScheduler(_ConsumerScheduler):
    """Consumer, ``receive="worker"``, scheduler process: names the transfers the workers
    run, installs what every rank staged, drops what nobody needs."""

    name = "consumer, scheduler (worker receive)"

    def __init__(self, conn, opts, counters):
        super().__init__(conn, opts, counters)
        self._items: dict[str, _StagedItem] = {}
        self._to_load: list[str] = []
        self._installs: list[str] = []
        self._drops: list[str] = []
        self._lang = None
        self._region = None

    def has_cache_item(self, identifier: str) -> bool:
        self._expire()
        self._mirror.asked(identifier)
        it = self._items.get(identifier)
        return it is not None and it.state == READY

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        self._expire()
        all_ready = True
        for index, feature in uncomputed(request, num_computed_tokens):
            h = feature.identifier
            if self._mirror.held(h) and self._can_recompute(feature):
                self._mirror.ref(h, request.request_id)
                continue                       # in vLLM's encoder cache
            it = self._items.get(h)
            if it is None:
                encoder, width, refusal = self._ask(request, h)
                if refusal or (encoder is not None and width != int(self.config.hidden_size)):
                    # this mode receives at one width (each worker's pool)
                    self._refused(request, h, refusal or f"width {width}: receive='worker' takes "
                                                         f"{self.config.hidden_size}-wide items only")
                    all_ready &= self._without_embresume(request, feature)
                    continue
                if encoder is None:
                    continue                   # nobody to ask: vLLM encodes it itself
                it = self._items[h] = _StagedItem(h, encoder, int(request.get_num_encoder_embeds(index)))
                self._to_load.append(h)
            it.requests.add(request.request_id)
            if it.state == READY:
                continue
            if it.state == FAILED and self._without_embresume(request, feature):
                continue                       # has_cache_item says no: vLLM encodes it locally
            all_ready = False
        return all_ready

    def update_state_after_alloc(self, request, index: int) -> None:
        h = request.mm_features[index].identifier
        self._mirror.ref(h, request.request_id)
        it = self._items.get(h)
        if it is None:
            self.counters.add("local_encodes")
            return
        if it.state == READY:
            self._installs.append(h)           # the workers move it into encoder_cache this step
            del self._items[h]
        elif it.state == FAILED:
            del self._items[h]                 # encoded locally
            self.counters.add("recomputes")
            self._alarm.recomputed(h)

    def build_connector_meta(self, scheduler_output) -> EmbresumeECMetadata:
        self._mirror_evicted(scheduler_output)
        meta = EmbresumeECMetadata()
        self._expire()
        now = time.monotonic()
        for h in self._to_load:
            it = self._items.get(h)
            if it is not None and it.state == PENDING:
                it.state, it.deadline = LOADING, now + self.opts.load_timeout
        self._to_load = []
        # every transfer a worker has not confirmed is named again: a worker that skipped a
        # step (or restarted) picks it up from the next metadata it sees
        meta.loads = [LoadSpec(it.mm_hash, it.encoder, it.num_embeds) for it in self._items.values()
                      if it.state == LOADING and not it.started]
        meta.installs, self._installs = self._installs, []
        meta.drops, self._drops = self._drops, []
        return meta

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.ec_connector_worker_meta
        if not isinstance(meta, EmbresumeECWorkerMetadata):
            return
        for h, reason in meta.failed.items():
            self._mark_failed(h, reason)
        for h in meta.started:
            it = self._items.get(h)
            if it is not None and it.state == LOADING:
                it.started = it.started or time.monotonic()
        for h in meta.staged:
            it = self._items.get(h)
            if it is not None and it.state == LOADING:
                it.state = READY

    def request_finished(self, request):
        rid = request.request_id
        self._unavailable.discard(rid)
        self._mirror_finished(request)
        for feature in request.mm_features:
            it = self._items.get(feature.identifier)
            if it is not None:
                it.requests.discard(rid)
                if not it.requests:
                    del self._items[it.mm_hash]
                    if it.state in (LOADING, READY):
                        self._drops.append(it.mm_hash)     # abort the transfer / free the staged copies
        return False, None

    def has_pending_push_work(self) -> bool:
        return any(it.state == LOADING for it in self._items.values())

    def _mark_failed(self, h: str, reason: str) -> None:
        it = self._items.get(h)
        if it is None or it.state not in (PENDING, LOADING, READY):
            return
        log.warning("embresume EC transfer of %s failed (%s): %s", h,
                    "recomputing locally where the media is at hand" if self.opts.on_failure == "recompute"
                    else "failing its requests", reason)
        self.counters.add("transfer_failures")
        self._alarm.failed(reason)
        it.state, it.reason = FAILED, reason
        self._drops.append(h)                  # ranks that got their copy forget it

    def _expire(self) -> None:
        now = time.monotonic()
        for it in list(self._items.values()):
            if it.state == LOADING and now > it.deadline:
                why = ("the workers never started it (they run the connector only in steps vLLM's "
                       "model runner calls it)" if not it.started
                       else f"not complete within load_timeout={self.opts.load_timeout:g}s")
                self._mark_failed(it.mm_hash, why)


class WorkerRecvWorker(Role):
    """Consumer, ``receive="worker"``, worker process: its own endpoint receives this rank's
    copy of each item into its own pool; the scheduler says when to install it."""

    name = "consumer, worker (worker receive)"

    def __init__(self, conn, opts, counters, tp_rank: int, tp_size: int, target: torch.device):
        super().__init__(conn, opts, counters)
        from ..language import LanguageEndpoint
        self._tp_rank, self._tp_size, self._target = tp_rank, tp_size, target
        self._inflight: dict[str, LoadSpec] = {}
        self._staged: dict[str, torch.Tensor] = {}
        self._failed: dict[str, str] = {}
        # the ranks of this engine are one TP group: another engine's rank can neither
        # join nor fail a room they asked for (vLLM gives every engine its own id)
        with unpinned(opts.unpin_threads):
            self._lang = LanguageEndpoint(self.config, tp_rank=tp_rank, connect=False, tp_group=opts.group)

    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        meta = self.meta()
        if meta is None:
            return
        for h in meta.drops:
            self._drop(h)
        for spec in meta.loads:
            self._start(spec)
        self._poll()
        for h in meta.installs:
            tensor = self._staged.pop(h, None)
            if tensor is not None:
                encoder_cache[h] = tensor
            elif h not in encoder_cache:
                # cannot happen: the scheduler installs only what every rank reported staged
                log.error("embresume EC: item %s scheduled as a cache hit is not staged on rank %d",
                          h, self._tp_rank)

    def get_finished(self, finished_req_ids):
        self._poll()
        return None, None

    def build_connector_worker_meta(self):
        self._poll()
        failed, self._failed = self._failed, {}
        return EmbresumeECWorkerMetadata(loaded=[], staged=frozenset(self._staged),
                                         started=frozenset(self._inflight) | frozenset(self._staged),
                                         failed=failed)

    def close(self) -> None:
        try:
            self._lang.close()
        except Exception:
            log.debug("closing an embresume endpoint failed", exc_info=True)
        self._staged.clear()

    def _start(self, spec: LoadSpec) -> None:
        h = spec.mm_hash
        if h in self._inflight or h in self._staged:
            return
        try:
            with unpinned(self.opts.unpin_threads):
                self._lang.request(h, self._tp_size, encoder=spec.encoder, expected_tokens=spec.num_embeds or None)
        except Exception as e:
            self._failed[h] = f"request to {spec.encoder} not started: {describe(e)}"
            return
        self._inflight[h] = spec

    def _poll(self) -> None:
        for h, spec in list(self._inflight.items()):
            try:
                st = self._lang.poll(h)
            except EmbResumeError as e:
                del self._inflight[h]
                self._failed[h] = describe(e)
                continue
            if st not in (Status.Success, Status.Failed):
                continue
            del self._inflight[h]
            try:
                res = self._lang.result(h)
            except TransferFailed as e:
                self._failed[h] = f"from {spec.encoder}: {e}"
                continue
            except EmbResumeError as e:
                self._failed[h] = describe(e)
                continue
            try:
                nbytes = res.embeddings.numel() * res.embeddings.element_size()
                self._staged[h] = self._take(res, spec)       # releases res unless it keeps its tensor
                self.counters.add("items_received")
                self.counters.add("bytes_received", nbytes)
            except Exception as e:
                self._failed[h] = describe(e)

    def _take(self, res, spec: LoadSpec) -> torch.Tensor:
        emb = res.embeddings
        if spec.num_embeds and emb.shape[0] != spec.num_embeds:
            res.release()
            raise ValueError(f"the encoder sent {emb.shape[0]} embeddings for {spec.mm_hash}, "
                             f"the request has {spec.num_embeds} placeholders")
        if emb.device == self._target and emb.dtype == self.opts.dtype and not self.config.zero_copy:
            return emb                          # the merged copy is ours: keep it (no release)
        out = emb.to(device=self._target, dtype=self.opts.dtype, copy=True)
        res.release()
        return out

    def _drop(self, h: str) -> None:
        self._staged.pop(h, None)
        if self._inflight.pop(h, None) is not None:
            discard(self._lang, h, "the language scheduler no longer needs it")


