"""vLLM encoder-cache connector on embresume.

Select it with::

    --ec-transfer-config '{"ec_connector": "EmbresumeECConnector",
                           "ec_connector_module_path": "embresume.integrations.vllm",
                           "ec_role": "ec_producer" | "ec_consumer",
                           "ec_connector_extra_config": {...}}'

vLLM builds one instance per process with ``(vllm_config, role)``: the
scheduler-role instance plans, the worker-role instances (one per worker
process, i.e. per tensor-parallel rank) move the data.  Items are keyed by the
multimodal hash (``mm_features[i].identifier``), which is also the embresume
room key; the value is one ``[num_embeds, width]`` tensor.

Producer (``ec_producer``, the encoder instance).  Worker rank 0 binds an
:class:`~embresume.EncoderEndpoint` at ``encoder_address``; every encoder
output vLLM hands to ``save_caches`` — and every already-cached item a new
request needs, through ``start_save_caches`` — is registered with
``send_tensors`` (no copy; after a CUDA event on the producing stream) and
sent to whichever language ranks ask for it, until ``request_timeout``.
``request_finished`` returns ``ec_transfer_params`` naming the encoder for
every item, for a proxy to forward to the consumer request.

Consumer (``ec_consumer``, the language instance).  The scheduler asks for
an item in ``ensure_cache_available`` (deferring the request), the workers
start the transfer (``LanguageEndpoint.request`` with the exact token count
as the size hint; resume stays the safety net) and report, through
``build_connector_worker_meta``, which items they hold.  Once every
tensor-parallel rank holds an item it becomes a cache hit
(``has_cache_item``); after vLLM allocated it in the encoder cache
(``update_state_after_alloc``) the workers move it into ``encoder_cache`` in
``start_load_caches``.  A failed or timed-out transfer never raises into the
engine: the item is recomputed locally when the request still carries its
media and the instance has the vision tower (``on_failure: "recompute"``,
the default), else the request is failed through
``take_unavailable_requests`` (a retryable error).

Tensor parallelism: vLLM gathers multimodal embeddings on every TP rank from
its own ``encoder_cache``, so every rank receives a full copy — each rank's
worker connector has its own ``LanguageEndpoint`` and asks with
``required_dst_info_num = tensor_parallel_size``; the encoder writes each
rank's copy and an item counts as held only when all ranks hold it
(:meth:`EmbresumeECWorkerMetadata.aggregate` intersects).

Options (``ec_connector_extra_config``): see ``docs/integrations.md`` and
:data:`OWN_KEYS`; every :class:`~embresume.Config` field is accepted too.
The consumer needs vLLM's V2 model runner (the default): the V1 runner does
not call EC connectors on steps that run no tokens, so transfers could not
progress while every request waits for one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)

from ..config import parse_dtype
from ..errors import ConfigError, EmbResumeError, TransferFailed
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
    "encoder_addresses": "consumer: the producers (list or comma-separated); an item goes to the "
                         "one its request's ec_transfer_params names, else pick_encoder(mm_hash, list)",
    "on_failure": "consumer: 'recompute' (default: encode locally when the request still carries "
                  "its media) or 'fail' (fail the request, a retryable error)",
    "load_timeout": "consumer: seconds the scheduler waits for the workers' report on a transfer "
                    "before giving up on it (default request_timeout + 30)",
}

#: key of the encoder address in ec_transfer_params (per item, or at the top level)
PARAM_KEY = "embresume_encoder"


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


# ---------------------------------------------------------------- metadata
@dataclass
class LoadSpec:
    mm_hash: str
    encoder: str
    num_embeds: int


@dataclass
class EmbresumeECMetadata(ECConnectorMetadata):
    """Scheduler -> workers, once per step."""

    loads: list = field(default_factory=list)        # [LoadSpec]: start receiving
    installs: list = field(default_factory=list)     # [mm_hash]: move into encoder_cache now
    drops: list = field(default_factory=list)        # [mm_hash]: abort / forget
    publish: list = field(default_factory=list)      # producer: [mm_hash] a request needs sent


@dataclass
class EmbresumeECWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers -> scheduler, once per step.

    ``staged`` is the full set of items this rank holds ready (a state, not a
    delta, so ranks that finish in different steps still intersect to the
    right answer); ``failed`` maps items that failed this step to a reason."""

    staged: frozenset = frozenset()
    failed: dict = field(default_factory=dict)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> "EmbresumeECWorkerMetadata":
        assert isinstance(other, EmbresumeECWorkerMetadata)
        failed = dict(self.failed)
        failed.update(other.failed)
        # every TP rank gathers from its own cache: an item is ready only where all ranks hold it
        return EmbresumeECWorkerMetadata(staged=self.staged & other.staged, failed=failed)


# ---------------------------------------------------------------- scheduler-side state
PENDING, LOADING, READY, FAILED = "pending", "loading", "ready", "failed"


@dataclass
class _Item:
    mm_hash: str
    encoder: str
    num_embeds: int
    state: str = PENDING
    requests: set = field(default_factory=set)
    deadline: float = 0.0
    reason: str = ""


class EmbresumeECConnector(ECConnectorBase):
    """vLLM EC connector moving encoder outputs with embresume (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        ec = vllm_config.ec_transfer_config
        extra = dict(ec.ec_connector_extra_config or {})
        self._extra = extra
        own = {k: extra[k] for k in OWN_KEYS if k in extra}
        model = vllm_config.model_config
        hidden = None
        dtype = None
        if model is not None:
            hidden = model.get_inputs_embeds_size()
            dtype = model.dtype if isinstance(model.dtype, torch.dtype) else None
        device = None
        if role == ECConnectorRole.WORKER and "device" not in extra:
            device = str(_worker_device())
        self._bind = own.get("encoder_address") or f"tcp://{ec.ec_ip}:{ec.ec_port}"
        self.config = build_config(extra, hidden_size=hidden, dtype=dtype, device=device,
                                   encoder_endpoint=self._bind, own_keys=OWN_KEYS,
                                   what="ec_connector_extra_config")
        self._dtype = parse_dtype(self.config.dtype)
        self._advertise = own.get("advertise_address") or advertised_address(self._bind)
        self._encoders = as_address_list(own.get("encoder_addresses"))
        self._on_failure = str(own.get("on_failure", "recompute"))
        if self._on_failure not in ("recompute", "fail"):
            raise ConfigError(f"on_failure must be 'recompute' or 'fail', got {self._on_failure!r}")
        self._load_timeout = float(own.get("load_timeout", self.config.request_timeout + 30.0))
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        if self.is_consumer and not vllm_config.use_v2_model_runner:
            raise ConfigError("EmbresumeECConnector as a consumer needs vLLM's V2 model runner "
                              "(VLLM_USE_V2_MODEL_RUNNER=1): the V1 runner skips EC connectors on steps "
                              "that run no tokens, so transfers could not progress")
        mm = getattr(model, "multimodal_config", None) if model is not None else None
        self._has_vision_tower = not bool(getattr(mm, "language_model_only", False))

        # scheduler side
        self._items: dict[str, _Item] = {}
        self._to_load: list[str] = []
        self._installs: list[str] = []
        self._drops: list[str] = []
        self._local: set[str] = set()            # mirror of vLLM's encoder cache (alloc/free)
        self._delivered: dict[str, set] = {}     # request id -> items it already received
        self._unavailable: set[str] = set()
        self._published: set[tuple[str, str]] = set()
        self._publish: list[str] = []

        # worker side
        self._lang = None
        self._enc = None
        self._publisher: Optional[_Publisher] = None
        self._inflight: dict[str, LoadSpec] = {}
        self._staged: dict[str, torch.Tensor] = {}
        self._failed: dict[str, str] = {}
        self._pending_publish: set[str] = set()
        self._receiving = True
        self._tp_rank = 0
        self._closed = False
        if role == ECConnectorRole.WORKER:
            self._tp_rank, tp_size, first_stage = _placement()
            self._tp_size = tp_size
            if self.is_consumer:
                self._receiving = first_stage   # later pipeline stages never gather embeddings
                if self._receiving:
                    from ..language import LanguageEndpoint
                    self._lang = LanguageEndpoint(self.config, tp_rank=self._tp_rank, connect=False)
                    # vLLM's encoder cache lives on the worker's device, wherever the receive pool is
                    self._target = _worker_device()
            if self.is_producer and self._tp_rank == 0 and first_stage:
                from ..encoder import EncoderEndpoint
                self._enc = EncoderEndpoint(self.config)
                self._publisher = _Publisher(self._enc)
                log.info("embresume EC producer: encoder endpoint %s (advertised as %s)",
                         self._enc.address, self._advertise)

    # ============================================================ scheduler side
    def has_cache_item(self, identifier: str) -> bool:
        if not self.is_consumer:
            return False
        self._expire()
        it = self._items.get(identifier)
        return it is not None and it.state == READY

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        if self.is_producer:
            self._note_publish(request, num_computed_tokens)
        if not self.is_consumer:
            return True
        self._expire()
        all_ready = True
        for index, feature in enumerate(request.mm_features):
            pos = feature.mm_position
            if pos.offset + pos.length <= num_computed_tokens:
                continue
            h = feature.identifier
            if h in self._local:
                continue                       # already in vLLM's encoder cache
            if h in self._delivered.get(request.request_id, ()):
                # delivered once and freed (preemption): the encoder no longer holds it
                if self._can_recompute(feature):
                    continue
                self._unavailable.add(request.request_id)
                all_ready = False
                continue
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

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        h = request.mm_features[index].identifier
        self._local.add(h)
        it = self._items.get(h)
        if it is None:
            return
        if it.state == READY:
            self._installs.append(h)           # the workers move it into encoder_cache this step
            del self._items[h]
            for rid in it.requests:
                self._delivered.setdefault(rid, set()).add(h)
        elif it.state == FAILED:
            del self._items[h]                 # encoded locally

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> EmbresumeECMetadata:
        for h in scheduler_output.free_encoder_mm_hashes:
            self._local.discard(h)
        self._expire()
        now = time.monotonic()
        meta = EmbresumeECMetadata()
        for h in self._to_load:
            it = self._items.get(h)
            if it is not None and it.state == PENDING:
                it.state, it.deadline = LOADING, now + self._load_timeout
                meta.loads.append(LoadSpec(h, it.encoder, it.num_embeds))
        self._to_load = []
        meta.installs, self._installs = self._installs, []
        meta.drops, self._drops = self._drops, []
        meta.publish, self._publish = self._publish, []
        return meta

    def update_connector_output(self, connector_output: "ECConnectorOutput") -> None:
        meta = connector_output.ec_connector_worker_meta
        if not isinstance(meta, EmbresumeECWorkerMetadata):
            return
        for h, reason in meta.failed.items():
            self._mark_failed(h, reason)
        for h in meta.staged:
            it = self._items.get(h)
            if it is not None and it.state == LOADING:
                it.state = READY

    def take_unavailable_requests(self) -> set[str]:
        out, self._unavailable = self._unavailable, set()
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
                    del self._items[h]
                    if it.state in (LOADING, READY):
                        self._drops.append(h)  # abort the transfer / free the staged copies
        if not self.is_producer:
            return False, None
        self._published = {p for p in self._published if p[0] != rid}
        if not request.mm_features:
            return False, None
        return False, self._transfer_params(request)

    def has_pending_push_work(self) -> bool:
        # keep the engine stepping while workers have transfers to report
        return any(it.state == LOADING for it in self._items.values())

    # ------------------------------------------------------------ scheduler helpers
    def _route(self, request: "Request", mm_hash: str) -> Optional[str]:
        params = getattr(request, "ec_transfer_params", None)
        if isinstance(params, dict):
            item = params.get(mm_hash)
            if isinstance(item, dict) and item.get(PARAM_KEY):
                return str(item[PARAM_KEY])
            for entry in params.get("ec_items") or ():
                if isinstance(entry, dict) and entry.get("mm_hash") == mm_hash and entry.get(PARAM_KEY):
                    return str(entry[PARAM_KEY])
            if params.get(PARAM_KEY):
                return str(params[PARAM_KEY])
        if self._encoders:
            return pick_encoder(mm_hash, self._encoders)
        return None

    def _can_recompute(self, feature) -> bool:
        return self._on_failure == "recompute" and self._has_vision_tower and feature.data is not None

    def _mark_failed(self, h: str, reason: str) -> None:
        it = self._items.get(h)
        if it is None or it.state not in (PENDING, LOADING, READY):
            return
        log.warning("embresume EC transfer of %s failed (%s): %s", h,
                    "recomputing locally where the media is at hand" if self._on_failure == "recompute"
                    else "failing its requests", reason)
        it.state, it.reason = FAILED, reason
        self._drops.append(h)                  # ranks that got their copy forget it

    def _expire(self) -> None:
        now = time.monotonic()
        for it in list(self._items.values()):
            if it.state == LOADING and now > it.deadline:
                self._mark_failed(it.mm_hash, f"no report from the workers within {self._load_timeout:.0f}s")

    def _note_publish(self, request: "Request", num_computed_tokens: int) -> None:
        rid = request.request_id
        for feature in request.mm_features:
            pos = feature.mm_position
            if pos.offset + pos.length <= num_computed_tokens:
                continue
            key = (rid, feature.identifier)
            if key not in self._published:
                self._published.add(key)
                self._publish.append(feature.identifier)

    def _transfer_params(self, request: "Request") -> dict[str, Any]:
        items: dict[str, Any] = {}
        if self._vllm_config.model_config is not None:
            try:
                from vllm.distributed.ec_transfer.ec_connector.utils import (
                    PlaceholderMetadataResolver, collect_ec_item_metadata)
                if not hasattr(self, "_resolver"):
                    self._resolver = PlaceholderMetadataResolver(self._vllm_config.model_config)
                items = collect_ec_item_metadata(request.mm_features, self._resolver)
            except Exception:
                log.debug("placeholder metadata unavailable", exc_info=True)
        for index, feature in enumerate(request.mm_features):
            entry = items.setdefault(feature.identifier, {"modality": feature.modality, "item_indices": [index]})
            entry[PARAM_KEY] = self._advertise
            entry["num_embeds"] = int(request.get_num_encoder_embeds(index))
        return items

    # ============================================================ worker side
    def start_save_caches(self, **kwargs: Any) -> None:
        if self._enc is None:
            return
        encoder_cache = kwargs.get("encoder_cache")
        meta = self._get_connector_metadata()
        for h in getattr(meta, "publish", ()):
            if encoder_cache is not None and h in encoder_cache:
                self._send(h, encoder_cache[h])     # cached earlier: vLLM will not save it again
            else:
                self._pending_publish.add(h)        # encoded this step: save_caches sends it

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs) -> None:
        if not self.is_producer or self._enc is None:
            return
        self._pending_publish.discard(mm_hash)
        tensor = encoder_cache.get(mm_hash)
        if tensor is not None:
            self._send(mm_hash, tensor)

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        if self._lang is None:
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, EmbresumeECMetadata):
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

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if self._lang is not None:
            self._poll()
        return None, None

    def build_connector_worker_meta(self) -> Optional[EmbresumeECWorkerMetadata]:
        if self._lang is None:
            # ranks that never receive must not report: staged sets are intersected
            return None
        self._poll()
        failed, self._failed = self._failed, {}
        return EmbresumeECWorkerMetadata(staged=frozenset(self._staged), failed=failed)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._publisher is not None:
            self._publisher.close()
        for ep in (self._lang, self._enc):
            if ep is not None:
                try:
                    ep.close()
                except Exception:
                    log.debug("closing an embresume endpoint failed", exc_info=True)
        self._staged.clear()

    # ------------------------------------------------------------ worker helpers
    def _start(self, spec: LoadSpec) -> None:
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
                self._staged[h] = self._take(res, spec)
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
        width, dtype = self.config.hidden_size, self._dtype
        if tensor.dim() != 2 or tensor.shape[1] != width:
            log.error("embresume EC producer: %s is %s, the transfer is configured for [*, %d] "
                      "(set hidden_size in ec_connector_extra_config); not sent", h, tuple(tensor.shape), width)
            return
        self._publisher.submit(h, tensor if tensor.dtype == dtype else tensor.to(dtype))


def _discard(lang, room, reason: str) -> None:
    """Abort ``room`` and drop whatever it left (a late result is released)."""
    try:
        lang.abort(room, reason)
        res = lang.result(room)
    except EmbResumeError:
        return
    res.release()


class _Publisher:
    """Registers producer tensors with the encoder endpoint off the engine's
    thread, once the stream that produced them has finished them."""

    def __init__(self, enc) -> None:
        self._enc = enc
        self._sides = ZeroSides()
        self._q: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="embresume-vllm-publish", daemon=True)
        self._thread.start()

    def submit(self, room: str, tensor: torch.Tensor) -> None:
        event = None
        if tensor.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
        self._q.put((room, tensor.detach(), event))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            room, tensor, event = job
            try:
                if event is not None:
                    event.synchronize()
                fill, mrope = self._sides.get(tensor.shape[0], tensor.device)
                self._enc.send_tensors(room, tensor.contiguous(), fill, mrope)
            except EmbResumeError as e:
                # typically: the same item is still in flight to an earlier request's consumer
                log.debug("embresume EC producer: %s not registered: %s", room, e)
            except Exception:
                log.exception("embresume EC producer: %s not registered", room)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
