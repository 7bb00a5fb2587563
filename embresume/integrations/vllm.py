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
(:meth:`~embresume.EncoderEndpoint.withdraw`); an item nobody asks for within
``request_timeout`` is registered again, not let go.  ``request_finished`` returns
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
   threads, not in vLLM's steps; the connector polls them once per scheduler step.
2. A finished transfer is copied into the landing region (written once per
   host, whatever the TP size; items of 1 MiB or more by the connector's lander
   thread, not vLLM's scheduler thread) when the region has room; otherwise it waits
   in the receive pool.  Landing evicts only items no waiting request needs
   and nobody has pinned.  ``has_cache_item`` is then true, lands nothing,
   and pins the item it reports present until this step's loads are out.
3. ``update_state_after_alloc`` names the pinned item in the next
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
   ``producer_max_bytes``) is given up at once, without waiting
   out ``failover_timeout`` or trying again.

``receive: "worker"`` keeps the direct path: each worker's own
``LanguageEndpoint`` receives its copy into its own pool (a GPU pool through
CUDA IPC when the worker is on a GPU), in ``start_load_caches``; this needs
vLLM's V2 model runner, which calls EC connectors on every step.

Structure: :class:`EmbresumeECConnector` is a facade over one role object per
process (:mod:`embresume.integrations._vllm_roles`: producer scheduler and
worker, landing consumer scheduler and worker, worker-receive consumer
scheduler and worker); the landing scheduler's per-item state is the pure
:class:`~embresume.integrations._items.ItemTracker`.

Options (``ec_connector_extra_config``): see ``docs/integrations.md`` and
:data:`OWN_KEYS`; every :class:`~embresume.Config` field is accepted too.
Statistics (items, bytes, failures, fail-overs, recomputes) reach vLLM's
metrics through ``get_ec_connector_stats`` / ``build_prom_metrics``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorPromMetrics, ECConnectorStats

from ._common import pick_encoder  # noqa: F401  (routing, part of this module's interface)
from . import _vllm_roles as roles
from ._vllm_roles import (  # noqa: F401  (the classes vLLM's processes exchange, and constants)
    BUSY_CODES, MAX_WIDTH, MAX_WIDTHS, PARAM_KEY, EmbresumeECMetadata, EmbresumeECWorkerMetadata, LoadSpec,
)

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
    "allowed_encoders": "consumer: more producers a request's ec_transfer_params may name, besides "
                        "encoder_addresses (list or comma-separated); params naming any other are refused",
    "item_widths": "consumer: item widths accepted besides hidden_size and the model's own (the LM width "
                   "and its encoder's output width, hidden x (1 + DeepStack levels)); list of ints",
    "unpin_threads": "both: run embresume's own threads on every core the process may use, not the "
                     "cores the engine pinned its worker to (default true; vLLM's CPU build pins)",
    "receive": "consumer: 'scheduler' (default: the scheduler process receives each item once into "
               "a host region every worker maps; V1 and V2 runners) or 'worker' (each worker receives "
               "its own copy into its own pool, CUDA IPC on GPUs; needs the V2 model runner)",
    "landing_bytes": "consumer, receive=scheduler: size of the shared host region landed items wait "
                     "in for the workers (default 512 MiB); unpinned items are evicted LRU first",
    "load_from_pool": "consumer, receive=scheduler: the workers read an item that arrived in one chunk "
                      "straight from the receive pool, no copy into the landing region (default true); "
                      "held items take at most half the pool's blocks and move into the region when it "
                      "runs short",
    "on_failure": "consumer: 'recompute' (default: encode locally when the request still carries "
                  "its media) or 'fail' (fail the request, a retryable error)",
    "failover_timeout": "consumer: seconds a transfer may go without data before it is given up "
                        "and tried again or failed over (default 15)",
    "max_attempts": "consumer: transfers tried per item before it counts as failed (default 3)",
    "load_timeout": "consumer: seconds one item may take in all, attempts included "
                    "(default request_timeout + 30)",
}

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
    "params_refused": "items whose ec_transfer_params named an encoder not allowed or a width not the model's",
    "items_held_in_pool": "items the workers read straight from the receive pool (load_from_pool)",
    "items_spilled": "items held in the receive pool moved into the landing region (the pool ran short)",
    "items_published": "producer: items offered to consumers",
    "items_not_published": "producer: items the producer could not offer",
    "items_withdrawn": "producer: items let go to stay within producer_max_bytes",
}


#: gauges of the consumer's scheduler (``vllm:embresume_ec_<name>``), reported when they change
GAUGE_NAMES = {
    "items_in_flight": "consumer: items being transferred, retried or waiting for landing room",
    "pool_blocks_used": "consumer: receive-pool blocks held (transfers in flight, results not landed yet)",
    "landing_bytes_used": "consumer: bytes of the landing region holding items (landed items stay as a cache)",
    "landing_items_pinned": "consumer: landed items pinned (reported present, or loads not all reported)",
    "pool_items_held": "consumer: items held in the receive pool for the workers (load_from_pool)",
}
GAUGE = "gauge:"


def _placement() -> tuple[int, int, bool]:
    """(tp_rank, tp_size, first pipeline stage) of this worker process."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        tp = get_tp_group()
        return tp.rank_in_group, tp.world_size, bool(get_pp_group().is_first_rank)
    except AssertionError:
        # groups exist only in a distributed run: outside one this worker is the whole instance
        return 0, 1, True


_worker_device = roles.worker_device


# ---------------------------------------------------------------- stats
class EmbresumeECStats(ECConnectorStats):
    """Counters since the last report (vLLM aggregates them per interval), and
    ``transfer_seconds``: the list of per-item transfer times (request to landed)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: ECConnectorStats) -> "EmbresumeECStats":
        for k, v in (other.data or {}).items():
            if k.startswith(GAUGE):
                self.data[k] = v                    # a level, not a count: the latest report
            else:
                self.data[k] = self.data.get(k, [] if isinstance(v, list) else 0) + v
        return self

    def reduce(self) -> dict:
        out = {k.removeprefix(GAUGE): v for k, v in self.data.items()
               if (v or k.startswith(GAUGE)) and not isinstance(v, list)}
        times = sorted(self.data.get("transfer_seconds") or ())
        if times:
            out["transfer_ms_p50"] = round(1e3 * times[len(times) // 2], 3)
            out["transfer_ms_max"] = round(1e3 * times[-1], 3)
        return out

    def is_empty(self) -> bool:
        # a gauge back at 0 is news too
        return not any(v or k.startswith(GAUGE) for k, v in self.data.items())


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
        self._gauges = {}
        for name, doc in GAUGE_NAMES.items():
            g = self._gauge_cls(name=f"vllm:embresume_ec_{name}", documentation=f"embresume: {doc}",
                                labelnames=labelnames, multiprocess_mode="mostrecent")
            self._gauges[name] = {idx: g.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0) -> None:
        for name, value in (transfer_stats_data or {}).items():
            if name.startswith(GAUGE):
                per_engine = self._gauges.get(name[len(GAUGE):])
                if per_engine is not None and engine_idx in per_engine:
                    per_engine[engine_idx].set(value)
                continue
            if name == "transfer_seconds":
                if engine_idx in self._transfer:
                    for t in value:
                        self._transfer[engine_idx].observe(t)
                continue
            per_engine = self._counters.get(name)
            if per_engine is not None and value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)


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
    """vLLM EC connector moving encoder outputs with embresume (see the module docstring).

    A facade: at construction it picks the role object of this process (producer or
    consumer, scheduler or worker, receive mode; :mod:`._vllm_roles`) and hands it every
    call of vLLM's ``ECConnectorBase`` API."""

    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        _join_vllm_logging()
        worker = role == ECConnectorRole.WORKER
        opts = roles.Options(vllm_config, worker, self.is_producer, OWN_KEYS)
        if self.is_consumer and opts.receive == "worker" and not vllm_config.use_v2_model_runner:
            raise roles.ConfigError(
                "EmbresumeECConnector with receive='worker' needs vLLM's V2 model runner "
                "(the V1 runner does not call EC connectors on steps that run no tokens); "
                "use the default receive='scheduler', which works with both runners")
        self.config = opts.config
        self.counters = roles.Counters(STAT_NAMES, lambda data: EmbresumeECStats(data=data))
        self._closed = False
        parts = []
        if worker:
            tp_rank, tp_size, first_stage = _placement()
            target = _worker_device()
            if self.is_producer:
                parts.append(roles.ProducerWorker(self, opts, self.counters,
                                                  producing=tp_rank == 0 and first_stage))
            if self.is_consumer and first_stage:      # later pipeline stages never gather embeddings
                if opts.receive == "worker":
                    parts.append(roles.WorkerRecvWorker(self, opts, self.counters, tp_rank, tp_size, target))
                else:
                    parts.append(roles.LandingWorker(self, opts, self.counters, target))
        else:
            if self.is_producer:
                parts.append(roles.ProducerScheduler(self, opts, self.counters))
            if self.is_consumer:
                parts.append(roles.WorkerRecvScheduler(self, opts, self.counters) if opts.receive == "worker"
                             else roles.LandingScheduler(self, opts, self.counters))
        if not parts:
            parts.append(roles.Role(self, opts, self.counters))
        self._impl: roles.Role = parts[0] if len(parts) == 1 else roles.Both(*parts)
        self._totals_logged = False
        self._last_gauges: dict = {}
        self._log_totals_on_stop_signals()

    def _log_totals_on_stop_signals(self) -> None:
        """The totals line when the engine's process is told to stop (SIGTERM, SIGINT).

        vLLM shuts the connector down only after its executor, and the server's process
        manager kills an engine process that takes longer than a few seconds: the line
        ``shutdown`` logs would often never appear.  vLLM's engine process installs its
        handlers before it builds the scheduler (and the connector), so they are chained
        here, in the process's main thread: the totals are logged, then vLLM's handler runs
        as before.  A signal left at its default disposition is not touched."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                prev = signal.getsignal(sig)
            except (ValueError, OSError):
                continue
            if not callable(prev) or getattr(prev, "_embresume_totals", False):
                continue

            def handler(signum, frame, prev=prev):
                try:
                    self._log_totals()
                finally:
                    prev(signum, frame)
            handler._embresume_totals = True
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                continue

    def __getattr__(self, name: str):
        # the role object's state (tests and tools look at it: _lang, _region, _items, _enc, ...)
        impl = self.__dict__.get("_impl")
        if impl is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(impl, name)

    # ============================================================ stats
    def get_ec_connector_stats(self) -> Optional[EmbresumeECStats]:
        stats = self.counters.take()
        gauges = self._impl.gauges()
        if gauges and gauges != self._last_gauges:
            self._last_gauges = gauges
            if stats is None:
                stats = EmbresumeECStats(data={})
            stats.data.update({GAUGE + k: v for k, v in gauges.items()})
        return stats

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
        return self._impl.has_cache_item(identifier)

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        return self._impl.ensure_cache_available(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        self._impl.update_state_after_alloc(request, index)

    def update_state_after_free(self, request: "Request", index: int) -> None:
        self._impl.update_state_after_free(request, index)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> EmbresumeECMetadata:
        return self._impl.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "ECConnectorOutput") -> None:
        self._impl.update_connector_output(connector_output)

    def take_unavailable_requests(self) -> set[str]:
        return self._impl.take_unavailable_requests()

    def request_finished(self, request: "Request") -> tuple[bool, Optional[dict[str, Any]]]:
        return self._impl.request_finished(request)

    def has_pending_push_work(self) -> bool:
        return self._impl.has_pending_push_work()

    # ============================================================ worker side
    def start_save_caches(self, **kwargs: Any) -> None:
        self._impl.start_save_caches(**kwargs)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs) -> None:
        self._impl.save_caches(encoder_cache, mm_hash, **kwargs)

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        self._impl.start_load_caches(encoder_cache, **kwargs)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        return self._impl.get_finished(finished_req_ids)

    def build_connector_worker_meta(self) -> Optional[EmbresumeECWorkerMetadata]:
        return self._impl.build_connector_worker_meta()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._log_totals()
        self._impl.close()

    def _log_totals(self) -> None:
        # once: at the stop signal, else first thing in shutdown (before anything that could
        # block: an engine stopping on a signal may be killed while it tears down)
        if self._totals_logged:
            return
        self._totals_logged = True
        times = sorted(self.counters.recent)
        summary = (f"; transfer time p50 {1e3 * times[len(times) // 2]:.2f} ms, "
                   f"p99 {1e3 * times[min(len(times) - 1, int(len(times) * 0.99))]:.2f} ms "
                   f"(last {len(times)})") if times else ""
        log.info("embresume EC connector (%s, %s) totals: %s%s", "producer" if self.is_producer else "consumer",
                 self.role.name.lower(), {k: v for k, v in self.counters.totals.items() if v}, summary)
