"""What every role of the vLLM connector shares: counters, the metadata vLLM's processes
exchange, the parsed options, the do-nothing :class:`Role` and :class:`Both`, and small
helpers.  The roles themselves: :mod:`._vllm_consumer` (landing), :mod:`._vllm_worker_recv`
(receive="worker"), :mod:`._vllm_producer`; the table of who runs where is in
:mod:`._vllm_roles`."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorMetadata, ECConnectorWorkerMetadata

from ..config import parse_dtype
from ..errors import ConfigError, EmbResumeError
from . import _items as I
from ._common import advertised_address, as_address_list, build_config

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("embresume.integrations.vllm")

#: the widest item row a producer may announce, and how many widths (a receive pool each)
#: one consumer takes
MAX_WIDTH = 1 << 16
MAX_WIDTHS = 4

#: embresume Config defaults inside a vLLM engine (an option of the same name overrides each).
#: The endpoints' threads share their process with the engine's own loop: on a busy host a
#: worker that spins between steps, its logging and its collector can keep them off the
#: interpreter for seconds, and the library's 3 s of heartbeat silence would then tear down
#: the link to a live peer (and fail its transfers over).  A peer on the same host that dies
#: is still noticed at once (its handshake socket closes, its pid is gone); across hosts,
#: after peer_timeout.
#: pipeline_bytes 0: the producer writes a chunk in one piece, with no PROGRESS reports.  The
#: consumer reads an item that comes in one chunk straight from its receive pool
#: (load_from_pool), so it never copies pieces out while the rest lands; the reports only
#: woke its threads (16.8 MB items, plain endpoints in two processes on 2 cores: request to
#: result 3.3-3.5 ms p50 in one piece, 3.9-4.0 ms in four; bench/pieces_ab.py).
ENGINE_DEFAULTS = {"peer_timeout": 15.0, "handshake_timeout": 20.0, "pipeline_bytes": 0}
#: consumer: seconds a transfer may go without data before it is tried again
FAILOVER_TIMEOUT = 15.0

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
    landed: dict = field(default_factory=dict)       # mm_hash -> (load_id, offset, shape, dtype, pool)
    #                                                  pool: None (in the region) or a receive pool's (pid, fd, size)
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
        pc = vllm_config.parallel_config
        # data parallel: every DP engine of an instance shares its config (engine_id included);
        # each gets its own producer port and TP group, as vLLM's own EC connectors do
        self.dp_size = int(getattr(pc, "data_parallel_size", 1) or 1)
        self.dp_index = int(getattr(pc, "data_parallel_index", 0) or 0) if self.dp_size > 1 else 0
        try:
            nnodes = int(getattr(pc, "nnodes_within_dp", None) or getattr(pc, "nnodes", 1) or 1)
        except Exception:
            nnodes = int(getattr(pc, "nnodes", 1) or 1)
        self.receive = str(own.get("receive", "scheduler"))
        if self.receive not in ("scheduler", "worker"):
            raise ConfigError(f"receive must be 'scheduler' or 'worker', got {self.receive!r}")
        device = None
        if "device" not in extra:
            if role_is_worker and (is_producer or self.receive == "worker"):
                device = str(worker_device())
            else:
                device = "cpu"                  # the scheduler receives into host memory
        self.bind = dp_address(own.get("encoder_address") or f"tcp://{ec.ec_ip}:{ec.ec_port}", self.dp_index)
        # the width: the option, else what the encoder produces (a producer measures it at
        # start-up; a consumer derives it from the model: DeepStack encoders are wider than
        # the LM), else the LM's embedding width.  Items are received only at the widths of
        # this set: an announced width outside it is refused (no pool is made for it)
        widths = dict(getattr(ec, "mm_encoder_output_widths", None) or {})
        self.encoder_width = model_encoder_width(model) if model is not None else None
        width = (extra.get("hidden_size") or (max(widths.values()) if widths else None) or self.encoder_width
                 or self.model_width)
        try:
            more = [int(w) for w in (own.get("item_widths") or ())]
        except (TypeError, ValueError):
            raise ConfigError(f"item_widths must be a list of widths, got {own.get('item_widths')!r}") from None
        if any(not 0 < w <= MAX_WIDTH for w in more) or len(more) > MAX_WIDTHS:
            raise ConfigError(f"item_widths: at most {MAX_WIDTHS} widths in [1, {MAX_WIDTH}], got {more}")
        self.widths = frozenset(int(w) for w in (width, self.model_width, self.encoder_width,
                                                 *widths.values(), *more) if w)
        self.config = build_config({**ENGINE_DEFAULTS, **extra}, hidden_size=width, dtype=dtype, device=device,
                                   encoder_endpoint=self.bind, own_keys=own_keys,
                                   what="ec_connector_extra_config")
        self.width_fixed = "hidden_size" in extra
        self.dtype = parse_dtype(self.config.dtype)
        self.advertise = own.get("advertise_address") or advertised_address(self.bind)
        self.encoders = as_address_list(own.get("encoder_addresses"))
        # the only encoders a request's ec_transfer_params may name (clients can send them
        # through the OpenAI server): encoder_addresses and allowed_encoders
        self.allowed_encoders = frozenset(self.encoders) | frozenset(as_address_list(own.get("allowed_encoders")))
        self.unpin_threads = bool(own.get("unpin_threads", True))
        if nnodes > 1 and not is_producer and self.receive == "scheduler":
            raise ConfigError(
                f"receive='scheduler' lands items in shared memory that every worker of the engine maps "
                f"on the scheduler's host; this engine spans {nnodes} nodes: use receive='worker' "
                f"(each worker receives its own copy; needs vLLM's V2 model runner)")
        self.on_failure = str(own.get("on_failure", "recompute"))
        if self.on_failure not in ("recompute", "fail"):
            raise ConfigError(f"on_failure must be 'recompute' or 'fail', got {self.on_failure!r}")
        self.load_timeout = positive(own, "load_timeout", self.config.request_timeout + 30.0)
        self.failover = positive(own, "failover_timeout", FAILOVER_TIMEOUT)
        self.max_attempts = int(positive(own, "max_attempts", 3))
        self.landing_bytes = size(own.get("landing_bytes", "512MiB"))
        self.load_from_pool = bool(own.get("load_from_pool", True))
        self.producer_max_bytes = size(own.get("producer_max_bytes", "1GiB"))
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
        self.group = group(ec, self.dp_index)


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

    def gauges(self) -> dict:
        """Levels for the ``vllm:embresume_ec_*`` gauges (GAUGE_NAMES): none by default."""
        return {}

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

    def gauges(self):
        return self.consumer.gauges()

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


def uncomputed(request: "Request", num_computed_tokens: int):
    """(index, feature) of the request's items whose placeholders are not all computed yet."""
    for index, feature in enumerate(request.mm_features):
        pos = feature.mm_position
        if pos.offset + pos.length > num_computed_tokens:
            yield index, feature


def group(ec, dp_index: int = 0) -> Optional[str]:
    """The TP-group identity of this engine's endpoints: vLLM's engine id, shared by its
    scheduler and every worker, and the DP rank (every DP engine of an instance has the
    same engine id; None: embresume's default, one group)."""
    engine_id = getattr(ec, "engine_id", None)
    if not engine_id:
        return None
    return f"vllm-{str(engine_id)[:48]}" + (f"-dp{dp_index}" if dp_index else "")


def dp_address(address: str, dp_index: int) -> str:
    """``address`` with its port moved up by the DP rank: one producer port per DP engine."""
    if not dp_index or address.endswith(":0"):
        return address
    head, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) + dp_index <= 65535:
        raise ConfigError(f"data parallel rank {dp_index} binds encoder_address's port + {dp_index}: "
                          f"{address!r} has no port that allows it")
    return f"{head}:{int(port) + dp_index}"


def model_encoder_width(model) -> Optional[int]:
    """The width of the model's encoder output, as vLLM measures it on a producer: the LM's
    embedding width, times 1 + the DeepStack levels where the vision tower has them
    (Qwen3-VL packs those layers' features beside the last one's)."""
    try:
        width = int(model.get_inputs_embeds_size())
    except Exception:
        return None
    hf = getattr(model, "hf_config", None)
    vision = getattr(hf, "vision_config", None)
    levels = getattr(vision, "deepstack_visual_indexes", None) or ()
    return width * (1 + len(levels))


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


