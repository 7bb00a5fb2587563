"""vLLM encoder-cache connector on embresume.

Select it with::

    --ec-transfer-config '{"ec_connector": "EmbresumeECConnector",
                           "ec_connector_module_path": "embresume.integrations.vllm",
                           "ec_role": "ec_producer" | "ec_consumer",
                           "ec_connector_extra_config": {...}}'

vLLM builds one instance per process with ``(vllm_config, role)``: the
scheduler-role instance in the engine's scheduler process, a worker-role
instance in each worker process (one per tensor-parallel rank).  Items are
keyed by the multimodal hash (``mm_features[i].identifier``), which is also
the embresume room key; the value is one ``[num_embeds, width]`` tensor.

Producer (``ec_producer``, the encoder instance).  Worker rank 0 binds an
:class:`~embresume.EncoderEndpoint` at ``encoder_address``; every encoder
output vLLM hands to ``save_caches`` (and every already-cached item a new
request needs, through ``start_save_caches`` where the runner calls it) is
*published*: registered with ``send_tensors`` (no copy; after a CUDA event
on the producing stream) under its hash.  A published item serves every
consumer request for it, one after the other, while the producer keeps it:
at most ``producer_max_bytes`` are held, least recently used first out
(:meth:`~embresume.EncoderEndpoint.withdraw`), and an item nobody asks for
goes at ``request_timeout``.  ``request_finished`` returns
``ec_transfer_params`` naming the encoder, the width and the dtype of each
item the producer can publish.

Consumer (``ec_consumer``, the language instance), ``receive: "scheduler"``
(the default; vLLM's V1 and V2 model runners).  The scheduler-side instance,
one per engine, owns one :class:`~embresume.LanguageEndpoint` (a host
receive pool) and one *landing region* (shared memory every worker of the
engine maps, :mod:`embresume.integrations._landing`):

1. ``ensure_cache_available`` starts a transfer for every item a request
   needs that is neither in vLLM's encoder cache nor landed, and defers the
   request while any is on its way.  Transfers progress on the endpoint's own
   threads, not in vLLM's steps; each call polls them.
2. A finished transfer is copied into the landing region (written once per
   host, whatever the TP size); ``has_cache_item`` is then true.
3. ``update_state_after_alloc`` pins the landed item and names it in the next
   metadata; each worker copies it from the region into its
   ``encoder_cache`` in ``start_load_caches`` (a step that runs the request's
   tokens, so V1's runner calls it) and reports it; after every rank's report
   the item is unpinned (it stays landed, evictable, for a later request).
4. A transfer without data within ``failover_timeout`` seconds, or failed, is
   tried again (``max_attempts``); then the item is recomputed locally when
   the request still carries its media and the instance has its vision tower
   (``on_failure: "recompute"``, the default), else the request is failed
   through ``take_unavailable_requests`` (a retryable error).  What a failure
   means is read from its code (:class:`~embresume.errors.FailCode`), never
   from its text: a room the producer is sending to another instance right
   now (BUSY, TP_GROUP) is asked again shortly, not counted as an attempt; an
   item the producer let go of (NOT_PUBLISHED: withdrawn past
   ``producer_max_bytes``, or expired) is given up at once, without waiting
   out ``failover_timeout`` or trying again.

``receive: "worker"`` keeps the direct path: each worker's own
``LanguageEndpoint`` receives its copy into its own pool (a GPU pool through
CUDA IPC when the worker is on a GPU), in ``start_load_caches``; this needs
vLLM's V2 model runner, which calls EC connectors on every step.

Options (``ec_connector_extra_config``): see ``docs/integrations.md`` and
:data:`OWN_KEYS`; every :class:`~embresume.Config` field is accepted too.
Statistics (items, bytes, failures, fail-overs, recomputes) reach vLLM's
metrics through ``get_ec_connector_stats`` / ``build_prom_metrics``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorPromMetrics, ECConnectorStats

from ..config import parse_dtype
from ..errors import ConfigError, EmbResumeError, FailCode, InvalidArgument, RoomInUse, TransferFailed
from ..status import Status
from ._common import ZeroSides, advertised_address, as_address_list, build_config, describe, pick_encoder

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("embresume.integrations.vllm")

#: ec_connector_extra_config keys of the adapter itself (all Config fields are accepted as well)
OWN_KEYS = {
    "encoder_address": "producer: the tcp://host:port the EncoderEndpoint binds "
                       "(default tcp://<ec_ip>:<ec_port> of the ec-transfer-config)",
    "advertise_address": "producer: the address request_finished reports to consumers "
                         "(default: encoder_address, with 0.0.0.0 replaced by this host's IP)",
    "producer_max_bytes": "producer: bytes of encoder outputs held for consumers (default 1 GiB); "
                          "least recently used items are withdrawn past it",
    "encoder_addresses": "consumer: the producers (list or comma-separated); an item goes to the "
                         "one its request's ec_transfer_params names, else pick_encoder(mm_hash, list)",
    "receive": "consumer: 'scheduler' (default: the scheduler process receives each item once into "
               "a host region every worker maps; V1 and V2 runners) or 'worker' (each worker receives "
               "its own copy into its own pool, CUDA IPC on GPUs; needs the V2 model runner)",
    "landing_bytes": "consumer, receive=scheduler: size of the shared host region landed items wait "
                     "in for the workers (default 512 MiB); unpinned items are evicted LRU first",
    "on_failure": "consumer: 'recompute' (default: encode locally when the request still carries "
                  "its media) or 'fail' (fail the request, a retryable error)",
    "failover_timeout": "consumer: seconds a transfer may go without data before it is given up "
                        "and tried again or failed over (default 5)",
    "max_attempts": "consumer: transfers tried per item before it counts as failed (default 3)",
    "load_timeout": "consumer: seconds one item may take in all, attempts included "
                    "(default request_timeout + 30)",
}

#: the encoder's refusals of an INIT for a room another engine instance is being sent
#: (the room is published again when that ends): asked again shortly, not a failed attempt
BUSY_CODES = frozenset({FailCode.BUSY, FailCode.TP_GROUP})

#: the widest item row a producer may announce, and how many widths (a receive pool each)
#: one consumer takes
MAX_WIDTH = 1 << 16
MAX_WIDTHS = 4

#: key of the encoder address in ec_transfer_params (per item, or at the top level)
PARAM_KEY = "embresume_encoder"

#: the counters of :class:`EmbresumeECStats` (also vLLM Prometheus counters ``vllm:embresume_ec_<name>``)
STAT_NAMES = {
    "items_received": "items that arrived through embresume",
    "bytes_received": "embedding bytes that arrived through embresume",
    "resumes": "resume rounds of received items",
    "items_loaded": "landed items copied into a worker's encoder cache",
    "transfer_failures": "items whose transfers all failed",
    "failovers": "transfers given up and tried again",
    "recomputes": "items encoded locally after a failed transfer",
    "local_encodes": "items the consumer's own vision tower encoded",
    "unavailable": "requests failed: an item could neither be received nor recomputed",
    "items_published": "producer: items offered to consumers",
    "items_not_published": "producer: items the producer could not offer",
    "items_withdrawn": "producer: items let go to stay within producer_max_bytes",
}


def _placement() -> tuple[int, int, bool]:
    """(tp_rank, tp_size, first pipeline stage) of this worker process."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        tp = get_tp_group()
        return tp.rank_in_group, tp.world_size, bool(get_pp_group().is_first_rank)
    except AssertionError:
        # groups exist only in a distributed run: outside one this worker is the whole instance
        return 0, 1, True


def _worker_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- stats
class EmbresumeECStats(ECConnectorStats):
    """Counters since the last report (vLLM aggregates them per interval), and
    ``transfer_seconds``: the list of per-item transfer times (request to landed)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: ECConnectorStats) -> "EmbresumeECStats":
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, [] if isinstance(v, list) else 0) + v
        return self

    def reduce(self) -> dict:
        out = {k: v for k, v in self.data.items() if v and not isinstance(v, list)}
        times = sorted(self.data.get("transfer_seconds") or ())
        if times:
            out["transfer_ms_p50"] = round(1e3 * times[len(times) // 2], 3)
            out["transfer_ms_max"] = round(1e3 * times[-1], 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


#: buckets of the ``vllm:embresume_ec_transfer_seconds`` histogram (0.1 ms to 30 s)
TRANSFER_BUCKETS = tuple(round(1e-4 * 2 ** (i / 2), 6) for i in range(37))


class EmbresumeECPromMetrics(ECConnectorPromMetrics):
    """``vllm:embresume_ec_<name>`` counters, one per :data:`STAT_NAMES` entry."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for name, doc in STAT_NAMES.items():
            c = self._counter_cls(name=f"vllm:embresume_ec_{name}", documentation=f"embresume: {doc}",
                                  labelnames=labelnames)
            self._counters[name] = {idx: c.labels(*values) for idx, values in per_engine_labelvalues.items()}
        h = self._histogram_cls(name="vllm:embresume_ec_transfer_seconds",
                                documentation="embresume: per-item transfer time, request to landed",
                                labelnames=labelnames, buckets=list(TRANSFER_BUCKETS))
        self._transfer = {idx: h.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0) -> None:
        for name, value in (transfer_stats_data or {}).items():
            if name == "transfer_seconds":
                if engine_idx in self._transfer:
                    for t in value:
                        self._transfer[engine_idx].observe(t)
                continue
            per_engine = self._counters.get(name)
            if per_engine is not None and value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)


class _Counters:
    """Totals since start (``totals``) and deltas since the last report."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(STAT_NAMES, 0)
        self.recent: "deque[float]" = deque(maxlen=4096)     # the last transfer times, for the log
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

    def take(self) -> Optional[EmbresumeECStats]:
        with self._lock:
            delta, self._delta = self._delta, {}
        return EmbresumeECStats(data=delta) if delta else None


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


# ---------------------------------------------------------------- scheduler-side state
PENDING, LOADING, RETRY, READY, FAILED = "pending", "loading", "retry", "ready", "failed"


@dataclass
class _Item:
    mm_hash: str
    encoder: str
    num_embeds: int
    width: int = 0
    state: str = PENDING
    requests: set = field(default_factory=set)
    attempts: int = 0
    started: float = 0.0          # this attempt
    born: float = field(default_factory=time.monotonic)
    deadline: float = 0.0         # all attempts
    retry_at: float = 0.0
    reason: str = ""
    result: Any = None            # a received result waiting for landing space


def _join_vllm_logging() -> None:
    """embresume's log lines go where vLLM's go (its handlers and format), unless the
    application configured the ``embresume`` logger itself."""
    ours = logging.getLogger("embresume")
    if ours.handlers:
        return
    theirs = logging.getLogger("vllm")
    if theirs.handlers:
        for h in theirs.handlers:
            ours.addHandler(h)
        if ours.level == logging.NOTSET:
            ours.setLevel(theirs.getEffectiveLevel())
        ours.propagate = False


class EmbresumeECConnector(ECConnectorBase):
    """vLLM EC connector moving encoder outputs with embresume (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        _join_vllm_logging()
        ec = vllm_config.ec_transfer_config
        extra = dict(ec.ec_connector_extra_config or {})
        self._extra = extra
        own = {k: extra[k] for k in OWN_KEYS if k in extra}
        model = vllm_config.model_config
        self._model_width = None
        dtype = None
        if model is not None:
            self._model_width = model.get_inputs_embeds_size()
            dtype = model.dtype if isinstance(model.dtype, torch.dtype) else None
        self._receive = str(own.get("receive", "scheduler"))
        if self._receive not in ("scheduler", "worker"):
            raise ConfigError(f"receive must be 'scheduler' or 'worker', got {self._receive!r}")
        device = None
        if "device" not in extra:
            if role == ECConnectorRole.WORKER and (self.is_producer or self._receive == "worker"):
                device = str(_worker_device())
            else:
                device = "cpu"                  # the scheduler receives into host memory
        self._bind = own.get("encoder_address") or f"tcp://{ec.ec_ip}:{ec.ec_port}"
        # the width: what the encoder produces (a producer measures it at start-up: DeepStack
        # encoders are wider than the LM), else the option, else the LM's embedding width
        widths = dict(getattr(ec, "mm_encoder_output_widths", None) or {})
        width = extra.get("hidden_size") or (max(widths.values()) if widths else None) or self._model_width
        self.config = build_config(extra, hidden_size=width, dtype=dtype, device=device,
                                   encoder_endpoint=self._bind, own_keys=OWN_KEYS,
                                   what="ec_connector_extra_config")
        self._width_fixed = "hidden_size" in extra
        self._dtype = parse_dtype(self.config.dtype)
        self._advertise = own.get("advertise_address") or advertised_address(self._bind)
        self._encoders = as_address_list(own.get("encoder_addresses"))
        self._on_failure = str(own.get("on_failure", "recompute"))
        if self._on_failure not in ("recompute", "fail"):
            raise ConfigError(f"on_failure must be 'recompute' or 'fail', got {self._on_failure!r}")
        self._load_timeout = _positive(own, "load_timeout", self.config.request_timeout + 30.0)
        self._failover = _positive(own, "failover_timeout", 5.0)
        self._max_attempts = int(_positive(own, "max_attempts", 3))
        self._landing_bytes = _size(own.get("landing_bytes", "512MiB"))
        self._producer_max_bytes = _size(own.get("producer_max_bytes", "1GiB"))
        pc = vllm_config.parallel_config
        self._tp_size = pc.tensor_parallel_size
        # one load report per worker that runs the connector: the tp x pcp ranks of the first
        # pipeline stage when the multiprocessing executor gathers every rank's output, else one
        pcp = int(getattr(pc, "prefill_context_parallel_size", 1) or 1)
        self._load_reports = (self._tp_size * pcp if pc.distributed_executor_backend == "mp" else 1)
        if self.is_consumer and self._receive == "worker" and not vllm_config.use_v2_model_runner:
            raise ConfigError("EmbresumeECConnector with receive='worker' needs vLLM's V2 model runner "
                              "(the V1 runner does not call EC connectors on steps that run no tokens); "
                              "use the default receive='scheduler', which works with both runners")
        mm = getattr(model, "multimodal_config", None) if model is not None else None
        self._has_vision_tower = not bool(getattr(mm, "language_model_only", False))
        self.counters = _Counters()

        # scheduler side
        self._items: dict[str, _Item] = {}
        self._local: set[str] = set()            # mirror of vLLM's encoder cache (alloc/free)
        self._unavailable: set[str] = set()
        self._published: set[tuple[str, str]] = set()
        self._publish: list[str] = []
        self._resolver = None
        self._lang = None                         # receive="scheduler": the engine's endpoint
        self._langs: dict[int, Any] = {}          # receive="scheduler": endpoint per item width
        self._region = None                       # receive="scheduler": the landing region
        self._landed_out: dict[str, tuple] = {}   # this step's loads
        self._load_acks: dict[int, list] = {}     # load id -> [mm_hash, reports outstanding]
        self._next_load = 0
        # receive="worker", scheduler side
        self._to_load: list[str] = []
        self._installs: list[str] = []
        self._drops: list[str] = []
        self._delivered: dict[str, set] = {}     # request id -> items it already received

        # worker side
        self._enc = None
        self._producing = False
        self._publisher: Optional[_Publisher] = None
        self._view = None                         # receive="scheduler": the mapped region
        self._loaded: list[int] = []
        self._inflight: dict[str, LoadSpec] = {}
        self._staged: dict[str, torch.Tensor] = {}
        self._failed: dict[str, str] = {}
        self._pending_publish: set[str] = set()
        self._receiving = True
        self._tp_rank = 0
        self._closed = False
        self._target = None
        if role == ECConnectorRole.SCHEDULER and self.is_consumer and self._receive == "scheduler":
            from ._landing import LandingRegion
            self._region = LandingRegion(self._landing_bytes)
            self._lang = self._endpoint_for(int(self.config.hidden_size))
            log.info("embresume EC consumer: items land in %.0f MiB of shared memory for %d worker(s)",
                     self._region.size / 2**20, self._load_reports)
        if role == ECConnectorRole.WORKER:
            self._tp_rank, tp_size, first_stage = _placement()
            self._tp_size = tp_size
            self._target = _worker_device()
            if self.is_consumer:
                self._receiving = first_stage   # later pipeline stages never gather embeddings
                if self._receiving and self._receive == "worker":
                    from ..language import LanguageEndpoint
                    # the ranks of this engine are one TP group: another engine's rank can neither
                    # join nor fail a room they asked for (vLLM gives every engine its own id)
                    self._lang = LanguageEndpoint(self.config, tp_rank=self._tp_rank, connect=False,
                                                  tp_group=_group(ec))
            self._producing = self.is_producer and self._tp_rank == 0 and first_stage
            if self._producing and self._width_fixed:
                self._start_encoder(int(self.config.hidden_size))

    # ============================================================ stats
    def get_ec_connector_stats(self) -> Optional[EmbresumeECStats]:
        return self.counters.take()

    @classmethod
    def build_ec_connector_stats(cls, data: Optional[dict] = None) -> EmbresumeECStats:
        return EmbresumeECStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return EmbresumeECPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @property
    def stats(self) -> dict:
        """Totals since start, for logs and tests (vLLM's metrics get the deltas)."""
        return dict(self.counters.totals)

    # ============================================================ scheduler side
    def has_cache_item(self, identifier: str) -> bool:
        if not self.is_consumer:
            return False
        if self._region is not None:
            self._pump()
            return identifier in self._region
        self._expire()
        it = self._items.get(identifier)
        return it is not None and it.state == READY

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        if self.is_producer:
            self._note_publish(request, num_computed_tokens)
        if not self.is_consumer:
            return True
        if self._region is not None:
            return self._ensure_landed(request, num_computed_tokens)
        return self._ensure_staged(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        if not self.is_consumer:
            return
        h = request.mm_features[index].identifier
        self._local.add(h)
        if self._region is not None:
            e = self._region.get(h)
            if e is None:
                # vLLM encodes it with its own vision tower
                it = self._items.pop(h, None)
                self.counters.add("recomputes" if it is not None and it.state == FAILED else "local_encodes")
                return
            if h not in self._landed_out:
                self._region.pin(h)
                load_id = self._next_load
                self._next_load += 1
                self._load_acks[load_id] = [h, self._load_reports]
                self._landed_out[h] = (load_id, e.offset, e.shape, e.dtype)
            return
        it = self._items.get(h)
        if it is None:
            self.counters.add("local_encodes")
            return
        if it.state == READY:
            self._installs.append(h)           # the workers move it into encoder_cache this step
            del self._items[h]
            for rid in it.requests:
                self._delivered.setdefault(rid, set()).add(h)
        elif it.state == FAILED:
            del self._items[h]                 # encoded locally
            self.counters.add("recomputes")

    def update_state_after_free(self, request: "Request", index: int) -> None:
        # vLLM freed the item from its encoder cache (preemption, eviction): a later request
        # for it loads it again (still landed, or asked again from the producer)
        self._local.discard(request.mm_features[index].identifier)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> EmbresumeECMetadata:
        for h in scheduler_output.free_encoder_mm_hashes:
            self._local.discard(h)
        meta = EmbresumeECMetadata()
        meta.publish, self._publish = self._publish, []
        if self._region is not None:
            self._pump()
            meta.region = self._region.descriptor()
            meta.landed, self._landed_out = self._landed_out, {}
            return meta
        if not self.is_consumer:
            return meta
        self._expire()
        now = time.monotonic()
        for h in self._to_load:
            it = self._items.get(h)
            if it is not None and it.state == PENDING:
                it.state, it.deadline = LOADING, now + self._load_timeout
        self._to_load = []
        # every transfer a worker has not confirmed is named again: a worker that skipped a
        # step (or restarted) picks it up from the next metadata it sees
        meta.loads = [LoadSpec(it.mm_hash, it.encoder, it.num_embeds) for it in self._items.values()
                      if it.state == LOADING and not it.started]
        meta.installs, self._installs = self._installs, []
        meta.drops, self._drops = self._drops, []
        return meta

    def update_connector_output(self, connector_output: "ECConnectorOutput") -> None:
        meta = connector_output.ec_connector_worker_meta
        if not isinstance(meta, EmbresumeECWorkerMetadata):
            return
        for load_id in meta.loaded:
            ack = self._load_acks.get(load_id)
            if ack is None:
                continue
            ack[1] -= 1
            if ack[1] <= 0:
                del self._load_acks[load_id]
                if self._region is not None:
                    self._region.unpin(ack[0])
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

    def take_unavailable_requests(self) -> set[str]:
        out, self._unavailable = self._unavailable, set()
        if out:
            self.counters.add("unavailable", len(out))
        return out

    def request_finished(self, request: "Request") -> tuple[bool, Optional[dict[str, Any]]]:
        rid = request.request_id
        self._unavailable.discard(rid)
        self._delivered.pop(rid, None)
        for feature in request.mm_features:
            h = feature.identifier
            it = self._items.get(h)
            if it is not None:
                it.requests.discard(rid)
                if not it.requests:
                    self._forget(it)
        if not self.is_producer:
            return False, None
        self._published = {p for p in self._published if p[0] != rid}
        if not request.mm_features:
            return False, None
        return False, self._transfer_params(request)

    def has_pending_push_work(self) -> bool:
        # keep the engine stepping while transfers are open or loads unconfirmed
        if self._region is not None:
            return bool(self._items) or bool(self._load_acks)
        return any(it.state == LOADING for it in self._items.values())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._publisher is not None:
            self._publisher.close()
        for it in self._items.values():
            if it.result is not None:
                it.result.release()
        for ep in {id(e): e for e in (self._lang, self._enc, *self._langs.values())}.values():
            if ep is not None:
                try:
                    ep.close()
                except Exception:
                    log.debug("closing an embresume endpoint failed", exc_info=True)
        for obj in (self._region, self._view):
            if obj is not None:
                obj.close()
        self._staged.clear()
        times = sorted(self.counters.recent)
        summary = (f"; transfer time p50 {1e3 * times[len(times) // 2]:.2f} ms, "
                   f"p99 {1e3 * times[min(len(times) - 1, int(len(times) * 0.99))]:.2f} ms "
                   f"(last {len(times)})") if times else ""
        log.info("embresume EC connector (%s, %s) totals: %s%s", "producer" if self.is_producer else "consumer",
                 self.role.name.lower(), {k: v for k, v in self.counters.totals.items() if v}, summary)

    # ------------------------------------------------------------ receive="scheduler"
    def _ensure_landed(self, request: "Request", num_computed_tokens: int) -> bool:
        self._pump()
        ready = True
        for index, feature in _uncomputed(request, num_computed_tokens):
            h = feature.identifier
            if h in self._local or h in self._region:
                continue                       # in vLLM's encoder cache, or landed
            it = self._items.get(h)
            if it is None:
                encoder = self._route(request, h)
                if encoder is None:
                    continue                   # nobody to ask: vLLM encodes it itself
                it = self._items[h] = _Item(h, encoder, int(request.get_num_encoder_embeds(index)),
                                            self._item_width(request, h),
                                            deadline=time.monotonic() + self._load_timeout)
                self._start(it)
            it.requests.add(request.request_id)
            if it.state == FAILED:
                if self._can_recompute(feature):
                    continue                   # has_cache_item says no: vLLM encodes it locally
                self._unavailable.add(request.request_id)
            ready = False
        return ready

    def _item_width(self, request: "Request", h: str) -> int:
        # the producer's announcement wins: it knows what its encoder produced
        entry = _param_entry(request, h)
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

    def _endpoint_for(self, width: int):
        """The endpoint receiving ``width``-wide items: one per width the producers
        announce (a pool's rows have one width; DeepStack items are wider than the LM)."""
        ep = self._langs.get(width)
        if ep is None:
            import dataclasses

            from ..language import LanguageEndpoint
            if len(self._langs) >= MAX_WIDTHS:
                raise InvalidArgument(f"item width {width} would be the {MAX_WIDTHS + 1}th: this consumer "
                                      f"receives at most {MAX_WIDTHS} widths (a pool each)")
            cfg = dataclasses.replace(self.config, hidden_size=width)
            if "zero_copy" not in self._extra:
                # an item that arrives in one chunk is copied into the landing region straight
                # from the pool: no merged copy in between (one host copy per item)
                cfg = dataclasses.replace(cfg, zero_copy=True)
            ep = self._langs[width] = LanguageEndpoint(cfg, tp_rank=0, connect=False,
                                                       tp_group=_group(self._vllm_config.ec_transfer_config))
        return ep

    def _start(self, it: _Item) -> None:
        now = time.monotonic()
        it.attempts += 1
        it.started = now
        it.state = LOADING
        try:
            ep = self._endpoint_for(it.width)
            ep.request(it.mm_hash, 1, encoder=it.encoder, expected_tokens=it.num_embeds or None)
        except RoomInUse:
            # the previous attempt has not ended here yet (its abort not confirmed, its
            # copy being released): try again shortly
            it.state, it.retry_at, it.attempts = RETRY, now + 0.05, it.attempts - 1
        except InvalidArgument as e:
            self._attempt_failed(it, describe(e), final=True)
        except EmbResumeError as e:
            self._attempt_failed(it, f"request to {it.encoder} not started: {describe(e)}")

    def _pump(self) -> None:
        """Poll every open transfer (non-blocking) and land what arrived."""
        if not self._items:
            return
        now = time.monotonic()
        for it in list(self._items.values()):
            if it.state == LOADING:
                self._poll_item(it, now)
            elif it.state == RETRY and now >= it.retry_at:
                self._start(it)
            elif it.state == READY and it.result is not None:
                self._land(it)

    def _poll_item(self, it: _Item, now: float) -> None:
        h = it.mm_hash
        lang = self._langs.get(it.width, self._lang)
        try:
            st = lang.poll(h)
        except EmbResumeError as e:
            self._attempt_failed(it, describe(e))
            return
        if st is Status.Success:
            try:
                it.result = lang.result(h)
            except EmbResumeError as e:
                self._attempt_failed(it, describe(e))
                return
            it.state = READY
            self._land(it)
        elif st is Status.Failed:
            reason, code = lang.failure_reason(h) or "failed", lang.failure_code(h)
            try:
                lang.result(h)
            except TransferFailed as e:
                reason, code = e.reason, e.code
            except EmbResumeError:
                pass
            if code in BUSY_CODES and now < it.deadline:
                # another engine instance is being sent this item right now: the producer
                # publishes it again when that ends; wait a little, it is no failed attempt
                it.state, it.retry_at, it.attempts = RETRY, now + 0.05, it.attempts - 1
                it.reason = reason
                return
            # NOT_PUBLISHED: the producer let go of the item (withdrawn, expired); it will not
            # come from there, so asking again is no use: recompute (or fail) now
            self._attempt_failed(it, f"from {it.encoder}: {reason}", final=code is FailCode.NOT_PUBLISHED)
        elif now > it.deadline:
            self._give_up(it, f"not complete within load_timeout={self._load_timeout:g}s")
        elif st in (Status.Bootstrapping, Status.WaitingForInput) and now - it.started > self._failover:
            self._give_up(it, f"no data from {it.encoder} within failover_timeout={self._failover:g}s")

    def _give_up(self, it: _Item, reason: str) -> None:
        _discard(self._langs.get(it.width, self._lang), it.mm_hash, reason)
        self._attempt_failed(it, reason)

    def _attempt_failed(self, it: _Item, reason: str, final: bool = False) -> None:
        now = time.monotonic()
        it.reason = reason
        backoff = min(1.0, 0.1 * 2 ** (it.attempts - 1))
        if not final and it.attempts < self._max_attempts and now + backoff < it.deadline:
            self.counters.add("failovers")
            log.info("embresume EC transfer of %s: attempt %d failed (%s); trying again",
                     it.mm_hash, it.attempts, reason)
            it.state, it.retry_at = RETRY, now + backoff
            return
        self.counters.add("transfer_failures")
        log.warning("embresume EC transfer of %s failed after %d attempt(s) (%s): %s", it.mm_hash,
                    it.attempts, "recomputing where the media is at hand" if self._on_failure == "recompute"
                    else "failing its requests", reason)
        it.state = FAILED

    def _land(self, it: _Item) -> None:
        res = it.result
        emb = res.embeddings
        if it.num_embeds and emb.shape[0] != it.num_embeds:
            it.result = None
            res.release()
            self._attempt_failed(it, f"the encoder sent {emb.shape[0]} embeddings for {it.mm_hash}, "
                                     f"the request has {it.num_embeds} placeholders", final=True)
            return
        e = self._region.alloc(it.mm_hash, tuple(emb.shape), self._dtype)
        if e is None:
            nbytes = emb.numel() * emb.element_size()
            if nbytes > self._region.size or time.monotonic() > it.deadline:
                # never fits, or the items being loaded kept the room past load_timeout:
                # give the result (and its pool blocks) back
                it.result = None
                res.release()
                self._attempt_failed(it, f"{nbytes} bytes found no room in the landing region "
                                         f"({self._region.size} bytes, landing_bytes)", final=True)
            return                  # the region is full of items being loaded: next poll
        self._region.tensor(e).copy_(emb)
        it.result = None
        self.counters.add("items_received")
        self.counters.add("bytes_received", emb.numel() * emb.element_size())
        self.counters.transfer(time.monotonic() - it.born)
        if res.resumes:
            self.counters.add("resumes", res.resumes)
        res.release()
        del self._items[it.mm_hash]

    def _forget(self, it: _Item) -> None:
        del self._items[it.mm_hash]
        if self._region is not None:
            if it.result is not None:
                it.result.release()
            elif it.state == LOADING:
                _discard(self._langs.get(it.width, self._lang), it.mm_hash,
                         "the language scheduler no longer needs it")
        elif it.state in (LOADING, READY):
            self._drops.append(it.mm_hash)     # abort the transfer / free the staged copies

    # ------------------------------------------------------------ receive="worker" (scheduler side)
    def _ensure_staged(self, request: "Request", num_computed_tokens: int) -> bool:
        self._expire()
        all_ready = True
        for index, feature in _uncomputed(request, num_computed_tokens):
            h = feature.identifier
            if h in self._local:
                continue                       # already in vLLM's encoder cache
            if h in self._delivered.get(request.request_id, ()):
                # delivered once and freed (preemption): ask the producer again (it keeps items)
                self._delivered[request.request_id].discard(h)
            it = self._items.get(h)
            if it is None:
                encoder = self._route(request, h)
                if encoder is None:
                    continue                   # nobody to ask: vLLM encodes it itself
                it = self._items[h] = _Item(h, encoder, int(request.get_num_encoder_embeds(index)))
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

    def _mark_failed(self, h: str, reason: str) -> None:
        it = self._items.get(h)
        if it is None or it.state not in (PENDING, LOADING, READY):
            return
        log.warning("embresume EC transfer of %s failed (%s): %s", h,
                    "recomputing locally where the media is at hand" if self._on_failure == "recompute"
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
                       else f"not complete within load_timeout={self._load_timeout:g}s")
                self._mark_failed(it.mm_hash, why)

    # ------------------------------------------------------------ scheduler helpers
    def _route(self, request: "Request", mm_hash: str) -> Optional[str]:
        entry = _param_entry(request, mm_hash)
        if entry is not None and entry.get(PARAM_KEY):
            return str(entry[PARAM_KEY])
        params = getattr(request, "ec_transfer_params", None)
        if isinstance(params, dict) and isinstance(params.get(PARAM_KEY), str):
            return params[PARAM_KEY]
        if self._encoders:
            return pick_encoder(mm_hash, self._encoders)
        return None

    def _metadata_resolver(self):
        if self._resolver is None and self._vllm_config.model_config is not None:
            from vllm.distributed.ec_transfer.ec_connector.utils import PlaceholderMetadataResolver
            self._resolver = PlaceholderMetadataResolver(self._vllm_config.model_config)
        return self._resolver

    def _has_media(self, feature) -> bool:
        """Whether the item still carries media the vision tower can encode
        (vLLM hands EC consumers metadata-only items: placeholder fields, no pixels)."""
        data = feature.data
        if not data:
            return False
        try:
            resolver = self._metadata_resolver()
            meta_fields = resolver.fields_for(feature.modality) if resolver is not None else set()
        except Exception:
            meta_fields = set()
        try:
            return any(getattr(v, "data", None) is not None for k, v in data.items() if k not in meta_fields)
        except AttributeError:
            return False

    def _can_recompute(self, feature) -> bool:
        return self._on_failure == "recompute" and self._has_vision_tower and self._has_media(feature)

    def _note_publish(self, request: "Request", num_computed_tokens: int) -> None:
        rid = request.request_id
        for _, feature in _uncomputed(request, num_computed_tokens):
            key = (rid, feature.identifier)
            if key not in self._published:
                self._published.add(key)
                self._publish.append(feature.identifier)

    def _transfer_params(self, request: "Request") -> dict[str, Any]:
        items: dict[str, Any] = {}
        resolver = None
        try:
            resolver = self._metadata_resolver()
            if resolver is not None:
                from vllm.distributed.ec_transfer.ec_connector.utils import collect_ec_item_metadata
                items = collect_ec_item_metadata(request.mm_features, resolver)
        except Exception:
            log.debug("placeholder metadata unavailable", exc_info=True)
        widths = dict(getattr(self._vllm_config.ec_transfer_config, "mm_encoder_output_widths", None) or {})
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        for index, feature in enumerate(request.mm_features):
            entry = items.setdefault(feature.identifier, {"modality": feature.modality, "item_indices": [index]})
            measured = widths.get(feature.modality)
            width = int(self.config.hidden_size) if self._width_fixed or measured is None else int(measured)
            num_embeds = int(request.get_num_encoder_embeds(index))
            # the worker will refuse these: no consumer is sent to ask for them
            if self._width_fixed and measured is not None and int(measured) != width:
                entry["embresume_not_published"] = f"the encoder's output is {measured} wide, hidden_size is {width}"
                continue
            if num_embeds * width * itemsize > self._producer_max_bytes:
                entry["embresume_not_published"] = "larger than producer_max_bytes"
                continue
            entry[PARAM_KEY] = self._advertise
            entry["num_embeds"] = num_embeds
            entry["width"] = width
            entry["dtype"] = _dtype_name(self._dtype)
        return items

    # ============================================================ worker side
    def start_save_caches(self, **kwargs: Any) -> None:
        if not self._producing:
            return
        encoder_cache = kwargs.get("encoder_cache")
        meta = self._get_connector_metadata()
        for h in getattr(meta, "publish", ()):
            if encoder_cache is not None and h in encoder_cache:
                self._send(h, encoder_cache[h])     # cached earlier: vLLM will not save it again
            else:
                self._pending_publish.add(h)        # encoded this step: save_caches sends it

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs) -> None:
        if not self._producing:
            return
        self._pending_publish.discard(mm_hash)
        tensor = encoder_cache.get(mm_hash)
        if tensor is not None:
            self._send(mm_hash, tensor)

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        if not self.is_consumer or not self._receiving:
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, EmbresumeECMetadata):
            return
        if meta.landed:
            self._load_landed(meta, encoder_cache)
        if self._lang is None:
            return
        for h in meta.drops:
            self._drop(h)
        for spec in meta.loads:
            self._start_worker(spec)
        self._poll()
        for h in meta.installs:
            tensor = self._staged.pop(h, None)
            if tensor is not None:
                encoder_cache[h] = tensor
            elif h not in encoder_cache:
                # cannot happen: the scheduler installs only what every rank reported staged
                log.error("embresume EC: item %s scheduled as a cache hit is not staged on rank %d",
                          h, self._tp_rank)

    def _load_landed(self, meta: EmbresumeECMetadata, encoder_cache: dict) -> None:
        from ._landing import LandingView
        if self._view is None or self._view.descriptor != tuple(meta.region):
            if self._view is not None:
                self._view.close()
            self._view = LandingView(meta.region)
        for h, (load_id, offset, shape, dtype) in meta.landed.items():
            src = self._view.tensor(offset, shape, dtype)
            encoder_cache[h] = src.to(device=self._target, dtype=self._dtype, copy=True)
            self._loaded.append(load_id)
            self.counters.add("items_loaded")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if self._lang is not None and self.role == ECConnectorRole.WORKER:
            self._poll()
        return None, None

    def build_connector_worker_meta(self) -> Optional[EmbresumeECWorkerMetadata]:
        if not self.is_consumer or not self._receiving:
            # ranks that never receive must not report: staged sets are intersected
            return None
        loaded, self._loaded = self._loaded, []
        if self._lang is None:
            return EmbresumeECWorkerMetadata(loaded=loaded, staged=frozenset(), started=frozenset())
        self._poll()
        failed, self._failed = self._failed, {}
        return EmbresumeECWorkerMetadata(loaded=loaded, staged=frozenset(self._staged),
                                         started=frozenset(self._inflight) | frozenset(self._staged),
                                         failed=failed)

    # ------------------------------------------------------------ worker helpers (receive="worker")
    def _start_worker(self, spec: LoadSpec) -> None:
        h = spec.mm_hash
        if h in self._inflight or h in self._staged:
            return
        try:
            self._lang.request(h, self._tp_size, encoder=spec.encoder,
                               expected_tokens=spec.num_embeds or None)
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
        if emb.device == self._target and emb.dtype == self._dtype and not self.config.zero_copy:
            return emb                          # the merged copy is ours: keep it (no release)
        out = emb.to(device=self._target, dtype=self._dtype, copy=True)
        res.release()
        return out

    def _drop(self, h: str) -> None:
        self._staged.pop(h, None)
        if self._inflight.pop(h, None) is not None:
            _discard(self._lang, h, "the language scheduler no longer needs it")

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
        self._publisher.submit(h, tensor if tensor.dtype == self._dtype else tensor.to(self._dtype))

    def _start_encoder(self, width: int) -> None:
        import dataclasses

        from ..encoder import EncoderEndpoint
        self._enc = EncoderEndpoint(dataclasses.replace(self.config, hidden_size=width))
        self._publisher = _Publisher(self._enc, self._producer_max_bytes, self.counters)
        log.info("embresume EC producer: encoder endpoint %s (advertised as %s), items %d wide",
                 self._enc.address, self._advertise, width)


def _uncomputed(request: "Request", num_computed_tokens: int):
    """(index, feature) of the request's items whose placeholders are not all computed yet."""
    for index, feature in enumerate(request.mm_features):
        pos = feature.mm_position
        if pos.offset + pos.length > num_computed_tokens:
            yield index, feature


def _group(ec) -> Optional[str]:
    """The TP-group identity of this engine's endpoints: vLLM's engine id, shared by its
    scheduler and every worker (None: embresume's default, one group)."""
    engine_id = getattr(ec, "engine_id", None)
    return f"vllm-{engine_id}"[:64] if engine_id else None


def _param_entry(request: "Request", mm_hash: str) -> Optional[dict]:
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


def _positive(own: dict, key: str, default: float) -> float:
    try:
        v = float(own.get(key, default))
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {own.get(key)!r}") from None
    if not v > 0:
        raise ConfigError(f"{key} must be positive, got {v!r}")
    return v


def _size(value) -> int:
    from ..config import parse_size
    try:
        n = parse_size(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad size {value!r}: {e}") from None
    if n <= 0:
        raise ConfigError(f"size must be positive, got {value!r}")
    return n


def _discard(lang, room, reason: str) -> None:
    """Abort ``room`` and drop whatever it left (a late result is released)."""
    try:
        lang.abort(room, reason)
        res = lang.result(room)
    except EmbResumeError:
        return
    res.release()


class _Publisher:
    """Publishes producer tensors off the engine's thread, once the stream
    that produced them has finished them, and keeps them published for
    several consumers within ``max_bytes`` (least recently used out)."""

    def __init__(self, enc, max_bytes: int, counters: _Counters) -> None:
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
