"""The role objects behind :class:`embresume.integrations.vllm.EmbresumeECConnector`.

vLLM builds one connector per process with ``(vllm_config, role)``; the
connector picks one of these at construction and hands every call of vLLM's
``ECConnectorBase`` API to it:

==========================  ==========================  =====================================
ec_role / receive           scheduler process           worker process (each TP rank)
==========================  ==========================  =====================================
``ec_producer``             :class:`ProducerScheduler`  :class:`ProducerWorker`
``ec_consumer`` scheduler   :class:`LandingScheduler`   :class:`LandingWorker`
``ec_consumer`` worker      :class:`WorkerRecvScheduler` :class:`WorkerRecvWorker`
``ec_both``                 :class:`Both` of the two above
==========================  ==========================  =====================================

:class:`Role` answers every call the way a connector that has nothing to do
answers it; each role overrides what it takes part in.  The landing
scheduler's per-item state is the pure :class:`~._items.ItemTracker`; this
module does its I/O (endpoint calls, region copies, counters, logs).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorMetadata, ECConnectorWorkerMetadata

from ..config import parse_dtype
from ..errors import ConfigError, EmbResumeError, InvalidArgument, RoomInUse, TransferFailed
from ..status import Status
from . import _items as I
from ._common import ZeroSides, advertised_address, as_address_list, build_config, describe, pick_encoder

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("embresume.integrations.vllm")

#: the widest item row a producer may announce, and how many widths (a receive pool each)
#: one consumer takes
MAX_WIDTH = 1 << 16
MAX_WIDTHS = 4

#: key of the encoder address in ec_transfer_params (per item, or at the top level)
PARAM_KEY = "embresume_encoder"

BUSY_CODES = I.BUSY_CODES


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- counters
class Counters:
    """Totals since start (``totals``) and deltas since the last report."""

    def __init__(self, names, make_stats) -> None:
        self.totals = dict.fromkeys(names, 0)
        self.recent: "deque[float]" = deque(maxlen=4096)     # the last transfer times, for the log
        self._make_stats = make_stats
        self._delta: dict = {}
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.totals[name] += n
            self._delta[name] = self._delta.get(name, 0) + n

    def transfer(self, seconds: float) -> None:
        with self._lock:
            self._delta.setdefault("transfer_seconds", []).append(seconds)
            self.recent.append(seconds)

    def take(self):
        with self._lock:
            delta, self._delta = self._delta, {}
        return self._make_stats(delta) if delta else None


# ---------------------------------------------------------------- metadata
@dataclass
class LoadSpec:
    mm_hash: str
    encoder: str
    num_embeds: int


@dataclass
class EmbresumeECMetadata(ECConnectorMetadata):
    """Scheduler -> workers, once per step."""

    # receive="scheduler": the landing region and the landed items to load this step
    region: Optional[tuple] = None                   # (pid, fd, size) of the scheduler's region
    landed: dict = field(default_factory=dict)       # mm_hash -> (load_id, offset, shape, dtype)
    # receive="worker": transfers the workers run themselves
    loads: list = field(default_factory=list)        # [LoadSpec]: start receiving (re-sent until started)
    installs: list = field(default_factory=list)     # [mm_hash]: move into encoder_cache now
    drops: list = field(default_factory=list)        # [mm_hash]: abort / forget
    # producer
    publish: list = field(default_factory=list)      # [mm_hash] a request needs sent


@dataclass
class EmbresumeECWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers -> scheduler, once per step.

    ``loaded`` lists the load ids this rank copied into its encoder cache
    (concatenated over ranks: the scheduler counts one report per rank).
    For ``receive="worker"``: ``staged`` is the full set of items this rank
    holds ready (a state, not a delta, so ranks that finish in different steps
    still intersect to the right answer), ``started`` the items it has begun
    receiving, ``failed`` maps items that failed this step to a reason."""

    loaded: list = field(default_factory=list)
    staged: frozenset = frozenset()
    started: frozenset = frozenset()
    failed: dict = field(default_factory=dict)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> "EmbresumeECWorkerMetadata":
        assert isinstance(other, EmbresumeECWorkerMetadata)
        failed = dict(self.failed)
        failed.update(other.failed)
        # every TP rank gathers from its own cache: an item is ready only where all ranks hold it
        return EmbresumeECWorkerMetadata(loaded=self.loaded + other.loaded,
                                         staged=self.staged & other.staged,
                                         started=self.started & other.started, failed=failed)


# ---------------------------------------------------------------- options
class Options:
    """``ec_connector_extra_config`` and the engine's config, parsed once per connector."""

    def __init__(self, vllm_config, role_is_worker: bool, is_producer: bool, own_keys: dict):
        ec = vllm_config.ec_transfer_config
        extra = dict(ec.ec_connector_extra_config or {})
        self.vllm_config = vllm_config
        self.extra = extra
        own = {k: extra[k] for k in own_keys if k in extra}
        model = vllm_config.model_config
        self.model_width = None
        dtype = None
        if model is not None:
            self.model_width = model.get_inputs_embeds_size()
            dtype = model.dtype if isinstance(model.dtype, torch.dtype) else None
        self.receive = str(own.get("receive", "scheduler"))
        if self.receive not in ("scheduler", "worker"):
            raise ConfigError(f"receive must be 'scheduler' or 'worker', got {self.receive!r}")
        device = None
        if "device" not in extra:
            if role_is_worker and (is_producer or self.receive == "worker"):
                device = str(worker_device())
            else:
                device = "cpu"                  # the scheduler receives into host memory
        self.bind = own.get("encoder_address") or f"tcp://{ec.ec_ip}:{ec.ec_port}"
        # the width: what the encoder produces (a producer measures it at start-up: DeepStack
        # encoders are wider than the LM), else the option, else the LM's embedding width
        widths = dict(getattr(ec, "mm_encoder_output_widths", None) or {})
        width = extra.get("hidden_size") or (max(widths.values()) if widths else None) or self.model_width
        self.config = build_config(extra, hidden_size=width, dtype=dtype, device=device,
                                   encoder_endpoint=self.bind, own_keys=own_keys,
                                   what="ec_connector_extra_config")
        self.width_fixed = "hidden_size" in extra
        self.dtype = parse_dtype(self.config.dtype)
        self.advertise = own.get("advertise_address") or advertised_address(self.bind)
        self.encoders = as_address_list(own.get("encoder_addresses"))
        self.on_failure = str(own.get("on_failure", "recompute"))
        if self.on_failure not in ("recompute", "fail"):
            raise ConfigError(f"on_failure must be 'recompute' or 'fail', got {self.on_failure!r}")
        self.load_timeout = positive(own, "load_timeout", self.config.request_timeout + 30.0)
        self.failover = positive(own, "failover_timeout", 5.0)
        self.max_attempts = int(positive(own, "max_attempts", 3))
        self.landing_bytes = size(own.get("landing_bytes", "512MiB"))
        self.producer_max_bytes = size(own.get("producer_max_bytes", "1GiB"))
        pc = vllm_config.parallel_config
        self.tp_size = pc.tensor_parallel_size
        # one load report per worker that runs the connector: the tp x pcp ranks of the first
        # pipeline stage when the multiprocessing executor gathers every rank's output, else one
        pcp = int(getattr(pc, "prefill_context_parallel_size", 1) or 1)
        self.load_reports = (self.tp_size * pcp if pc.distributed_executor_backend == "mp" else 1)
        # pipeline parallel: only the first stage loads (it gathers the embeddings).  The V2
        # runner passes the first stage's EC output on; the V1 runner drops the output of
        # every stage but the last, so no report ever comes: a load then ends after as many
        # steps as the pipeline holds batches (and two for async scheduling)
        pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
        self.load_lease_steps = pp + 2
        if pp > 1 and not bool(getattr(vllm_config, "use_v2_model_runner", False)):
            self.load_reports = 0
        mm = getattr(model, "multimodal_config", None) if model is not None else None
        self.has_vision_tower = not bool(getattr(mm, "language_model_only", False))
        self.group = group(ec)


# ---------------------------------------------------------------- roles
class Role:
    """A role that takes no part: every call answered as a connector with nothing to do."""

    name = "idle"

    def __init__(self, conn, opts: Options, counters: Counters):
        self.conn = conn                  # the facade (vLLM's connector object: its bound metadata)
        self.opts = opts
        self.config = opts.config
        self.counters = counters

    # scheduler side
    def has_cache_item(self, identifier: str) -> bool:
        return False

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        return True

    def update_state_after_alloc(self, request, index: int) -> None:
        pass

    def update_state_after_free(self, request, index: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output) -> EmbresumeECMetadata:
        return EmbresumeECMetadata()

    def update_connector_output(self, connector_output) -> None:
        pass

    def take_unavailable_requests(self) -> set:
        return set()

    def request_finished(self, request) -> tuple[bool, Optional[dict]]:
        return False, None

    def has_pending_push_work(self) -> bool:
        return False

    # worker side
    def start_save_caches(self, **kwargs) -> None:
        pass

    def save_caches(self, encoder_cache, mm_hash: str, **kwargs) -> None:
        pass

    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        pass

    def get_finished(self, finished_req_ids):
        return None, None

    def build_connector_worker_meta(self):
        return None

    def close(self) -> None:
        pass

    def meta(self) -> Optional[EmbresumeECMetadata]:
        m = self.conn._get_connector_metadata()
        return m if isinstance(m, EmbresumeECMetadata) else None


class Both(Role):
    """``ec_both``: a producer role and a consumer role of the same process side."""

    name = "producer+consumer"

    def __init__(self, producer: Role, consumer: Role):
        super().__init__(consumer.conn, consumer.opts, consumer.counters)
        self.producer, self.consumer = producer, consumer

    def __getattr__(self, name):
        return getattr(self.consumer, name)

    def has_cache_item(self, identifier):
        return self.consumer.has_cache_item(identifier)

    def ensure_cache_available(self, request, num_computed_tokens):
        self.producer.ensure_cache_available(request, num_computed_tokens)
        return self.consumer.ensure_cache_available(request, num_computed_tokens)

    def update_state_after_alloc(self, request, index):
        self.consumer.update_state_after_alloc(request, index)

    def update_state_after_free(self, request, index):
        self.consumer.update_state_after_free(request, index)

    def build_connector_meta(self, scheduler_output):
        meta = self.consumer.build_connector_meta(scheduler_output)
        meta.publish = self.producer.build_connector_meta(scheduler_output).publish
        return meta

    def update_connector_output(self, connector_output):
        self.consumer.update_connector_output(connector_output)

    def take_unavailable_requests(self):
        return self.consumer.take_unavailable_requests()

    def request_finished(self, request):
        self.consumer.request_finished(request)
        return self.producer.request_finished(request)

    def has_pending_push_work(self):
        return self.consumer.has_pending_push_work()

    def start_save_caches(self, **kwargs):
        self.producer.start_save_caches(**kwargs)

    def save_caches(self, encoder_cache, mm_hash, **kwargs):
        self.producer.save_caches(encoder_cache, mm_hash, **kwargs)

    def start_load_caches(self, encoder_cache, **kwargs):
        self.consumer.start_load_caches(encoder_cache, **kwargs)

    def get_finished(self, finished_req_ids):
        return self.consumer.get_finished(finished_req_ids)

    def build_connector_worker_meta(self):
        return self.consumer.build_connector_worker_meta()

    def close(self):
        self.producer.close()
        self.consumer.close()


class CacheMirror:
    """What vLLM's encoder cache holds for certain, as the scheduler's calls show it.

    vLLM's ``EncoderCacheManager`` keeps an item while a request references it
    and evicts only unreferenced ones, when it needs room (reported in
    ``SchedulerOutput.free_encoder_mm_hashes``); ``update_state_after_free`` is
    the release of one request's reference, no eviction.  So an item is held
    for certain while a request we know of references it: one that allocated
    it, or one we let through because it was held (vLLM's cache hit adds its
    reference).  ``reset_encoder_cache`` empties vLLM's cache without telling
    any connector; vLLM asks ``has_cache_item`` only about items it lacks, so
    that call for a held item shows a reset, and the mirror is emptied."""

    def __init__(self) -> None:
        self.refs: dict[str, set] = {}

    def held(self, h: str) -> bool:
        return bool(self.refs.get(h))

    def ref(self, h: str, rid: str) -> None:
        self.refs.setdefault(h, set()).add(rid)

    def release(self, h: str, rid: str) -> None:
        refs = self.refs.get(h)
        if refs is not None:
            refs.discard(rid)
            if not refs:
                del self.refs[h]

    def evicted(self, h: str) -> None:
        self.refs.pop(h, None)

    def asked(self, h: str) -> None:
        """``has_cache_item(h)``: vLLM lacks ``h``."""
        if self.held(h):
            self.refs.clear()


class _ConsumerScheduler(Role):
    """What both consumer schedulers share: routing, recompute decisions, unavailable requests."""

    def __init__(self, conn, opts, counters):
        super().__init__(conn, opts, counters)
        self._unavailable: set[str] = set()
        self._resolver = None
        self._mirror = CacheMirror()

    def update_state_after_free(self, request, index: int) -> None:
        # one request's reference released: vLLM keeps the item until it needs the room
        self._mirror.release(request.mm_features[index].identifier, request.request_id)

    def _mirror_evicted(self, scheduler_output) -> None:
        for h in getattr(scheduler_output, "free_encoder_mm_hashes", None) or ():
            self._mirror.evicted(h)

    def _mirror_finished(self, request) -> None:
        # vLLM's free(request) drops the request's references without calling the connector
        for feature in request.mm_features:
            self._mirror.release(feature.identifier, request.request_id)

    def take_unavailable_requests(self) -> set:
        out, self._unavailable = self._unavailable, set()
        if out:
            self.counters.add("unavailable", len(out))
        return out

    def _route(self, request: "Request", mm_hash: str) -> Optional[str]:
        entry = param_entry(request, mm_hash)
        if entry is not None and entry.get(PARAM_KEY):
            return str(entry[PARAM_KEY])
        params = getattr(request, "ec_transfer_params", None)
        if isinstance(params, dict) and isinstance(params.get(PARAM_KEY), str):
            return params[PARAM_KEY]
        if self.opts.encoders:
            return pick_encoder(mm_hash, self.opts.encoders)
        return None

    def _has_media(self, feature) -> bool:
        """Whether the item still carries media the vision tower can encode
        (vLLM hands EC consumers metadata-only items: placeholder fields, no pixels)."""
        data = feature.data
        if not data:
            return False
        try:
            resolver = metadata_resolver(self)
            meta_fields = resolver.fields_for(feature.modality) if resolver is not None else set()
        except Exception:
            meta_fields = set()
        try:
            return any(getattr(v, "data", None) is not None for k, v in data.items() if k not in meta_fields)
        except AttributeError:
            return False

    def _can_recompute(self, feature) -> bool:
        return self.opts.on_failure == "recompute" and self.opts.has_vision_tower and self._has_media(feature)

    def _item_width(self, request, h: str) -> int:
        # the producer's announcement wins: it knows what its encoder produced
        entry = param_entry(request, h)
        if entry is not None:
            try:
                w = int(entry.get("width") or 0)
            except (TypeError, ValueError):
                w = 0
            if 0 < w <= MAX_WIDTH:
                return w
            if w:
                log.warning("embresume EC: %s announced %r wide, not in [1, %d]; receiving it at %d",
                            h, entry.get("width"), MAX_WIDTH, self.config.hidden_size)
        return int(self.config.hidden_size)


class LandingScheduler(_ConsumerScheduler):
    """Consumer, ``receive="scheduler"``, scheduler process: one receive endpoint per item
    width, the landing region, the item tracker, and a mirror of what vLLM's encoder
    cache holds."""

    name = "consumer, scheduler (landing)"

    def __init__(self, conn, opts, counters):
        super().__init__(conn, opts, counters)
        from ._landing import LandingRegion
        self.tracker = I.ItemTracker(max_attempts=opts.max_attempts, failover_timeout=opts.failover,
                                     load_timeout=opts.load_timeout)
        self._langs: dict[int, Any] = {}
        self._results: dict[str, Any] = {}        # mm_hash -> received result, until landed
        self._landed_out: dict[str, tuple] = {}   # this step's loads
        self._next_load = 0
        self._region = LandingRegion(opts.landing_bytes)
        self._lang = self._endpoint_for(int(self.config.hidden_size))
        log.info("embresume EC consumer: items land in %.0f MiB of shared memory for %s",
                 self._region.size / 2**20, f"{opts.load_reports} worker(s)" if opts.load_reports else
                 f"the first pipeline stage (loads end after {opts.load_lease_steps} steps)")

    @property
    def _items(self) -> dict:
        return self.tracker.items

    # ------------------------------------------------------------ vLLM's calls
    def has_cache_item(self, identifier: str) -> bool:
        self._mirror.asked(identifier)
        if self.tracker.present(identifier):
            self._run(self.tracker.handle(I.Reserve(identifier)))
            return True
        return False

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        self._pump()
        ready = True
        now = time.monotonic()
        for index, feature in uncomputed(request, num_computed_tokens):
            h = feature.identifier
            if self._mirror.held(h) and (self.tracker.present(h) or self._can_recompute(feature)):
                # in vLLM's encoder cache (and should a reset have emptied it, landed or
                # recomputable: no metadata-only item is sent to local encoding)
                self._mirror.ref(h, request.request_id)
                continue
            if self.tracker.get(h) is None:
                encoder = self._route(request, h)
                if encoder is None:
                    continue                   # nobody to ask: vLLM encodes it itself
                need = I.Need(request.request_id, h, encoder, int(request.get_num_encoder_embeds(index)),
                              self._item_width(request, h), now)
            else:
                need = I.Need(request.request_id, h, "", 0, 0, now)
            self._run(self.tracker.handle(need))
            phase = self.tracker.phase(h)
            if phase in (I.P.LANDED, I.P.PINNED):
                continue
            if phase is I.P.FAILED:
                if self._can_recompute(feature):
                    continue                   # has_cache_item says no: vLLM encodes it locally
                self._unavailable.add(request.request_id)
            ready = False
        return ready

    def update_state_after_alloc(self, request, index: int) -> None:
        h = request.mm_features[index].identifier
        rid = request.request_id
        self._mirror.ref(h, rid)
        if self.tracker.phase(h) is not I.P.PINNED:
            # not reported present: vLLM encodes it with its own vision tower
            failed = self.tracker.phase(h) is I.P.FAILED
            self.counters.add("recomputes" if failed else "local_encodes")
            self._run(self.tracker.handle(I.LocalEncode(rid, h)))
            return
        load_id = None
        if h not in self._landed_out:
            e = self._region.get(h)
            load_id = self._next_load
            self._next_load += 1
            self._landed_out[h] = (load_id, e.offset, e.shape, e.dtype)
        self._run(self.tracker.handle(I.Alloc(rid, h, load_id, self.opts.load_reports,
                                              self.opts.load_lease_steps)))

    def build_connector_meta(self, scheduler_output) -> EmbresumeECMetadata:
        self._mirror_evicted(scheduler_output)
        self._pump()
        self._run(self.tracker.handle(I.StepEnd()))
        meta = EmbresumeECMetadata(region=self._region.descriptor())
        meta.landed, self._landed_out = self._landed_out, {}
        return meta

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.ec_connector_worker_meta
        if not isinstance(meta, EmbresumeECWorkerMetadata):
            return
        for load_id in meta.loaded:
            self._run(self.tracker.handle(I.LoadReported(load_id)))

    def request_finished(self, request) -> tuple[bool, Optional[dict]]:
        self._unavailable.discard(request.request_id)
        self._mirror_finished(request)
        hashes = tuple(f.identifier for f in request.mm_features)
        self._run(self.tracker.handle(I.RequestFinished(request.request_id, hashes)))
        return False, None

    def has_pending_push_work(self) -> bool:
        # keep the engine stepping while transfers are open or loads unconfirmed
        return self.tracker.busy()

    def close(self) -> None:
        for res in self._results.values():
            res.release()
        self._results.clear()
        for ep in self._langs.values():
            try:
                ep.close()
            except Exception:
                log.debug("closing an embresume endpoint failed", exc_info=True)
        self._region.close()

    # ------------------------------------------------------------ the tracker's actions
    def _pump(self) -> None:
        """Poll every open transfer (non-blocking), start due retries, land what arrived."""
        if not self.tracker.items:
            return
        now = time.monotonic()
        for it in self.tracker.in_phase(I.P.TRANSFERRING):
            self._run(self.tracker.handle(self._poll(it, now)))
        self._run(self.tracker.handle(I.Tick(now)))

    def _poll(self, it: I.Item, now: float) -> I.Polled:
        h = it.mm_hash
        lang = self._langs.get(it.width, self._lang)
        try:
            st = lang.poll(h)
        except EmbResumeError as e:
            return I.Polled(h, now, Status.Failed, getattr(e, "code", None), describe(e))
        if st is Status.Success:
            try:
                self._results[h] = lang.result(h)
            except EmbResumeError as e:
                return I.Polled(h, now, Status.Failed, getattr(e, "code", None), describe(e))
        elif st is Status.Failed:
            reason, code = lang.failure_reason(h) or "failed", lang.failure_code(h)
            try:
                lang.result(h)
            except TransferFailed as e:
                reason, code = e.reason, e.code
            except EmbResumeError:
                pass
            return I.Polled(h, now, st, code, reason)
        return I.Polled(h, now, st)

    def _run(self, actions: list) -> None:
        todo = deque(actions)
        while todo:
            a = todo.popleft()
            if isinstance(a, I.Start):
                todo.extend(self.tracker.handle(self._start(a)))
            elif isinstance(a, I.Land):
                todo.extend(self._land(a.mm_hash))
            elif isinstance(a, I.Discard):
                discard(self._langs.get(a.width, self._lang), a.mm_hash, a.reason)
            elif isinstance(a, I.Release):
                res = self._results.pop(a.mm_hash, None)
                if res is not None:
                    res.release()
            elif isinstance(a, I.Pin):
                self._region.pin(a.mm_hash)
            elif isinstance(a, I.Unpin):
                self._region.unpin(a.mm_hash)
            elif isinstance(a, I.Retrying):
                self.counters.add("failovers")
                log.info("embresume EC transfer of %s: attempt %d failed (%s); trying again",
                         a.mm_hash, a.attempt, a.reason)
            elif isinstance(a, I.GaveUp):
                self.counters.add("transfer_failures")
                log.warning("embresume EC transfer of %s failed after %d attempt(s) (%s): %s", a.mm_hash,
                            a.attempts, "recomputing where the media is at hand"
                            if self.opts.on_failure == "recompute" else "failing its requests", a.reason)

    def _start(self, a: I.Start):
        now = time.monotonic()
        try:
            ep = self._endpoint_for(a.width)
            ep.request(a.mm_hash, 1, encoder=a.encoder, expected_tokens=a.num_embeds or None)
        except RoomInUse as e:
            # the previous attempt has not ended here yet (its abort not confirmed, its
            # copy being released): try again shortly
            return I.StartFailed(a.mm_hash, now, describe(e), in_use=True)
        except InvalidArgument as e:
            return I.StartFailed(a.mm_hash, now, describe(e), final=True)
        except EmbResumeError as e:
            return I.StartFailed(a.mm_hash, now, f"request to {a.encoder} not started: {describe(e)}")
        return I.Started(a.mm_hash, now)

    def _land(self, h: str) -> list:
        it = self.tracker.get(h)
        res = self._results.get(h)
        if it is None or res is None or it.phase is not I.P.RECEIVED:
            return []
        emb = res.embeddings
        if it.num_embeds and emb.shape[0] != it.num_embeds:
            return self.tracker.handle(I.Rejected(h, f"the encoder sent {emb.shape[0]} embeddings for {h}, "
                                                     f"the request has {it.num_embeds} placeholders"))
        evicted: list[str] = []
        e = self._region.alloc(h, tuple(emb.shape), self.opts.dtype, evictable=self.tracker.evictable,
                               on_evict=evicted.append)
        out: list = []
        for victim in evicted:
            out += self.tracker.handle(I.Evicted(victim))
        if e is None:
            nbytes = emb.numel() * emb.element_size()
            return out + self.tracker.handle(I.NoRoom(h, time.monotonic(), never=nbytes > self._region.size))
        self._region.tensor(e).copy_(emb)
        del self._results[h]
        self.counters.add("items_received")
        self.counters.add("bytes_received", emb.numel() * emb.element_size())
        self.counters.transfer(time.monotonic() - it.born)
        if res.resumes:
            self.counters.add("resumes", res.resumes)
        res.release()
        return out + self.tracker.handle(I.Landed(h))

    # ------------------------------------------------------------ endpoints
    def _endpoint_for(self, width: int):
        """The endpoint receiving ``width``-wide items: one per width the producers
        announce (a pool's rows have one width; DeepStack items are wider than the LM)."""
        ep = self._langs.get(width)
        if ep is None:
            from ..language import LanguageEndpoint
            if len(self._langs) >= MAX_WIDTHS:
                raise InvalidArgument(f"item width {width} would be the {MAX_WIDTHS + 1}th: this consumer "
                                      f"receives at most {MAX_WIDTHS} widths (a pool each)")
            cfg = dataclasses.replace(self.config, hidden_size=width)
            if "zero_copy" not in self.opts.extra:
                # an item that arrives in one chunk is copied into the landing region straight
                # from the pool: no merged copy in between (one host copy per item)
                cfg = dataclasses.replace(cfg, zero_copy=True)
            ep = self._langs[width] = LanguageEndpoint(cfg, tp_rank=0, connect=False, tp_group=self.opts.group)
        return ep


class LandingWorker(Role):
    """Consumer, ``receive="scheduler"``, worker process: maps the landing region and copies
    each item the metadata names into ``encoder_cache``."""

    name = "consumer, worker (landing)"

    def __init__(self, conn, opts, counters, target: torch.device):
        super().__init__(conn, opts, counters)
        self._target = target
        self._view = None
        self._loaded: list[int] = []

    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        meta = self.meta()
        if meta is None or not meta.landed:
            return
        from ._landing import LandingView
        if self._view is None or self._view.descriptor != tuple(meta.region):
            if self._view is not None:
                self._view.close()
            self._view = LandingView(meta.region)
        for h, (load_id, offset, shape, dtype) in meta.landed.items():
            src = self._view.tensor(offset, shape, dtype)
            encoder_cache[h] = src.to(device=self._target, dtype=self.opts.dtype, copy=True)
            self._loaded.append(load_id)
            self.counters.add("items_loaded")

    def build_connector_worker_meta(self):
        loaded, self._loaded = self._loaded, []
        return EmbresumeECWorkerMetadata(loaded=loaded, staged=frozenset(), started=frozenset())

    def close(self) -> None:
        if self._view is not None:
            self._view.close()


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
                encoder = self._route(request, h)
                if encoder is None:
                    continue                   # nobody to ask: vLLM encodes it itself
                it = self._items[h] = _StagedItem(h, encoder, int(request.get_num_encoder_embeds(index)))
                self._to_load.append(h)
            it.requests.add(request.request_id)
            if it.state == READY:
                continue
            if it.state == FAILED:
                if self._can_recompute(feature):
                    continue                   # has_cache_item says no: vLLM encodes it locally
                self._unavailable.add(request.request_id)
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


# ---------------------------------------------------------------- producer
class ProducerScheduler(Role):
    """Producer, scheduler process: names the items requests need published (for runners
    that call ``start_save_caches``) and answers ``ec_transfer_params``."""

    name = "producer, scheduler"

    def __init__(self, conn, opts, counters):
        super().__init__(conn, opts, counters)
        self._published: set[tuple[str, str]] = set()
        self._publish: list[str] = []
        self._resolver = None

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        rid = request.request_id
        for _, feature in uncomputed(request, num_computed_tokens):
            key = (rid, feature.identifier)
            if key not in self._published:
                self._published.add(key)
                self._publish.append(feature.identifier)
        return True

    def build_connector_meta(self, scheduler_output) -> EmbresumeECMetadata:
        meta = EmbresumeECMetadata()
        meta.publish, self._publish = self._publish, []
        return meta

    def request_finished(self, request):
        rid = request.request_id
        self._published = {p for p in self._published if p[0] != rid}
        if not request.mm_features:
            return False, None
        return False, self._transfer_params(request)

    def _transfer_params(self, request) -> dict[str, Any]:
        items: dict[str, Any] = {}
        try:
            resolver = metadata_resolver(self)
            if resolver is not None:
                from vllm.distributed.ec_transfer.ec_connector.utils import collect_ec_item_metadata
                items = collect_ec_item_metadata(request.mm_features, resolver)
        except Exception:
            log.debug("placeholder metadata unavailable", exc_info=True)
        opts = self.opts
        widths = dict(getattr(opts.vllm_config.ec_transfer_config, "mm_encoder_output_widths", None) or {})
        itemsize = torch.empty((), dtype=opts.dtype).element_size()
        for index, feature in enumerate(request.mm_features):
            entry = items.setdefault(feature.identifier, {"modality": feature.modality, "item_indices": [index]})
            measured = widths.get(feature.modality)
            width = int(self.config.hidden_size) if opts.width_fixed or measured is None else int(measured)
            num_embeds = int(request.get_num_encoder_embeds(index))
            # the worker will refuse these: no consumer is sent to ask for them
            if opts.width_fixed and measured is not None and int(measured) != width:
                entry["embresume_not_published"] = f"the encoder's output is {measured} wide, hidden_size is {width}"
                continue
            if num_embeds * width * itemsize > opts.producer_max_bytes:
                entry["embresume_not_published"] = "larger than producer_max_bytes"
                continue
            entry[PARAM_KEY] = opts.advertise
            entry["num_embeds"] = num_embeds
            entry["width"] = width
            entry["dtype"] = dtype_name(opts.dtype)
        return items


class ProducerWorker(Role):
    """Producer, worker process: TP rank 0 of the first pipeline stage publishes every
    encoder output with its :class:`~embresume.EncoderEndpoint` (other ranks do nothing)."""

    name = "producer, worker"

    def __init__(self, conn, opts, counters, producing: bool):
        super().__init__(conn, opts, counters)
        self._producing = producing
        self._enc = None
        self._publisher: Optional[Publisher] = None
        self._pending_publish: set[str] = set()
        if producing and opts.width_fixed:
            self._start_encoder(int(self.config.hidden_size))

    def start_save_caches(self, **kwargs) -> None:
        if not self._producing:
            return
        encoder_cache = kwargs.get("encoder_cache")
        meta = self.meta()
        for h in getattr(meta, "publish", ()):
            if encoder_cache is not None and h in encoder_cache:
                self._send(h, encoder_cache[h])     # cached earlier: vLLM will not save it again
            else:
                self._pending_publish.add(h)        # encoded this step: save_caches sends it

    def save_caches(self, encoder_cache, mm_hash: str, **kwargs) -> None:
        if not self._producing:
            return
        self._pending_publish.discard(mm_hash)
        tensor = encoder_cache.get(mm_hash)
        if tensor is not None:
            self._send(mm_hash, tensor)

    def _send(self, h: str, tensor: torch.Tensor) -> None:
        if tensor.dim() != 2:
            log.error("embresume EC producer: %s is %s, not [num_embeds, width]; not published",
                      h, tuple(tensor.shape))
            self.counters.add("items_not_published")
            return
        if self._enc is None:
            # the width is what the encoder produces (DeepStack outputs are wider than the LM)
            self._start_encoder(int(tensor.shape[1]))
        if tensor.shape[1] != self._enc.config.hidden_size:
            log.error("embresume EC producer: %s is %s wide, this encoder endpoint sends %d-wide items "
                      "(set hidden_size in ec_connector_extra_config); not published",
                      h, tensor.shape[1], self._enc.config.hidden_size)
            self.counters.add("items_not_published")
            return
        self._publisher.submit(h, tensor if tensor.dtype == self.opts.dtype else tensor.to(self.opts.dtype))

    def _start_encoder(self, width: int) -> None:
        from ..encoder import EncoderEndpoint
        self._enc = EncoderEndpoint(dataclasses.replace(self.config, hidden_size=width))
        self._publisher = Publisher(self._enc, self.opts.producer_max_bytes, self.counters)
        log.info("embresume EC producer: encoder endpoint %s (advertised as %s), items %d wide",
                 self._enc.address, self.opts.advertise, width)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
        if self._enc is not None:
            try:
                self._enc.close()
            except Exception:
                log.debug("closing an embresume endpoint failed", exc_info=True)


# ---------------------------------------------------------------- helpers
def uncomputed(request: "Request", num_computed_tokens: int):
    """(index, feature) of the request's items whose placeholders are not all computed yet."""
    for index, feature in enumerate(request.mm_features):
        pos = feature.mm_position
        if pos.offset + pos.length > num_computed_tokens:
            yield index, feature


def group(ec) -> Optional[str]:
    """The TP-group identity of this engine's endpoints: vLLM's engine id, shared by its
    scheduler and every worker (None: embresume's default, one group)."""
    engine_id = getattr(ec, "engine_id", None)
    return f"vllm-{engine_id}"[:64] if engine_id else None


def metadata_resolver(role: Role):
    if role._resolver is None and role.opts.vllm_config.model_config is not None:
        from vllm.distributed.ec_transfer.ec_connector.utils import PlaceholderMetadataResolver
        role._resolver = PlaceholderMetadataResolver(role.opts.vllm_config.model_config)
    return role._resolver


def param_entry(request: "Request", mm_hash: str) -> Optional[dict]:
    params = getattr(request, "ec_transfer_params", None)
    if not isinstance(params, dict):
        return None
    item = params.get(mm_hash)
    if isinstance(item, dict):
        return item
    for entry in params.get("ec_items") or ():
        if isinstance(entry, dict) and entry.get("mm_hash") == mm_hash:
            return entry
    return None


def positive(own: dict, key: str, default: float) -> float:
    try:
        v = float(own.get(key, default))
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {own.get(key)!r}") from None
    if not v > 0:
        raise ConfigError(f"{key} must be positive, got {v!r}")
    return v


def size(value) -> int:
    from ..config import parse_size
    try:
        n = parse_size(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad size {value!r}: {e}") from None
    if n <= 0:
        raise ConfigError(f"size must be positive, got {value!r}")
    return n


def discard(lang, room, reason: str) -> None:
    """Abort ``room`` and drop whatever it left (a late result is released)."""
    try:
        lang.abort(room, reason)
        res = lang.result(room)
    except EmbResumeError:
        return
    res.release()


class Publisher:
    """Publishes producer tensors off the engine's thread, once the stream
    that produced them has finished them, and keeps them published for
    several consumers within ``max_bytes`` (least recently used out)."""

    def __init__(self, enc, max_bytes: int, counters: Counters) -> None:
        self._enc = enc
        self._max_bytes = max_bytes
        self._counters = counters
        self._sides = ZeroSides()
        self._held: "OrderedDict[str, torch.Tensor]" = OrderedDict()   # LRU first
        self._bytes = 0
        self._q: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="embresume-vllm-publish", daemon=True)
        self._thread.start()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def submit(self, room: str, tensor: torch.Tensor) -> None:
        # published on our thread a little later: a consumer's INIT that comes first waits for
        # it, even if this item was withdrawn or expired before (not answered NOT_PUBLISHED)
        self._enc.expect(room)
        event = None
        if tensor.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
        self._q.put(("new", room, tensor.detach(), event))

    def _done(self, room, status) -> None:
        # called by the endpoint under its lock: hand over to our thread
        self._q.put(("done", room, status, None))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            kind, room, arg, event = job
            try:
                if kind == "new":
                    if event is not None:
                        event.synchronize()
                    self._new(room, arg)
                else:
                    self._after(room, arg)
            except Exception:
                log.exception("embresume EC producer: %s", room)

    def _new(self, room: str, tensor: torch.Tensor) -> None:
        if room in self._held:
            self._held.move_to_end(room)        # published already: it serves this request too
            return
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self._max_bytes:
            log.error("embresume EC producer: %s is %d bytes, producer_max_bytes is %d; not published",
                      room, nbytes, self._max_bytes)
            self._counters.add("items_not_published")
            return
        while self._bytes + nbytes > self._max_bytes and self._evict_one():
            pass
        tensor = tensor.contiguous()
        if not self._register(room, tensor):
            return
        self._held[room] = tensor
        self._bytes += nbytes
        self._counters.add("items_published")

    def _evict_one(self) -> bool:
        for room in list(self._held):
            if self._enc.withdraw(room):
                self._drop(room)
                self._counters.add("items_withdrawn")
                return True
        return False                 # every held item is being sent: over the bound until one ends

    def _register(self, room: str, tensor: torch.Tensor) -> bool:
        fill, mrope = self._sides.get(tensor.shape[0], tensor.device)
        try:
            self._enc.send_tensors(room, tensor, fill, mrope, on_done=self._done)
            return True
        except EmbResumeError as e:
            log.warning("embresume EC producer: %s not published: %s", room, e)
            self._counters.add("items_not_published")
            return False

    def _after(self, room: str, status) -> None:
        tensor = self._held.get(room)
        if tensor is None:
            return
        if status is Status.Success:
            # delivered: published again for the next consumer that asks
            if not self._register(room, tensor):
                self._drop(room)
        else:
            # nobody asked within request_timeout, or withdrawn, or failed: let go
            self._drop(room)

    def _drop(self, room: str) -> None:
        tensor = self._held.pop(room, None)
        if tensor is not None:
            self._bytes -= tensor.numel() * tensor.element_size()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
