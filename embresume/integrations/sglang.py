"""SGLang plugin: encoder-disaggregation embeddings through embresume.

SGLang's encoder disaggregation (``--encoder-only`` instances, a
``--language-only --encoder-urls ...`` instance) with
``--encoder-transfer-backend zmq_to_scheduler`` pushes each embedding part to
every scheduler (TP) rank as a ZeroMQ payload frame.  This plugin keeps all of
SGLang's control flow (``/encode``, ``/scheduler_receive_url``, the per-part
``EmbeddingData`` metadata, the TP status all-reduce, timeouts, aborts) and
replaces only the payload:

* encoder side — ``sglang.srt.disaggregation.encoder.server.ZmqDelivery`` is
  replaced (class ``REPLACE`` hook) by :func:`delivery_class`'s subclass: the
  part's tensor is registered with an embresume ``EncoderEndpoint``
  (``send_tensors``, no copy) under the part's request id, and each scheduler
  rank gets, over SGLang's own ZeroMQ path, the part's metadata with the
  embresume room and encoder address instead of the tensor bytes; ``send``
  returns once every rank has its copy (or raises, which SGLang reports as a
  failed delivery).  Anything this path cannot carry (an error payload, an
  unexpected width, embresume not starting) goes the original ZeroMQ way.
* scheduler side — ``sglang.srt.disaggregation.encoder.receiver.WaitingZmqRequest``
  (and ``WaitingZmqRequestGrpc``) is replaced by :func:`waiting_class`'s
  subclass (:func:`waiting_grpc_class`'s): a metadata part that names
  an embresume room starts ``LanguageEndpoint.request`` (non-blocking, with
  ``required_dst_info_num`` = the TP size, so every rank gets a full copy, and
  the part's token count as the size hint); each scheduler tick polls it, and
  a finished transfer joins SGLang's normal part aggregation.  A failed
  transfer fails that request through SGLang's own FAIL status (all-reduced
  over the TP group, then aborted with the reason) — never the scheduler.

Untrusted parts (scheduler side): a part arrives on the scheduler's ZeroMQ
receive port, which anyone who reaches it can write to, so nothing in it is
trusted.  Before anything is dialled or allocated (:func:`check_part`): its
encoder address must be one of the configured ``encoder_addresses`` (options,
else ``EMBRESUME_ENCODER_ADDRESSES``, else ``encoder_endpoint``), its room
must be this request's part, its row count at most ``max_part_tokens``, its
width the configured ``hidden_size`` (else at most ``max_hidden_size``), its
dtype a float one (the configured ``dtype`` if set).  The embedding a
transfer brings must have the shape and dtype the part announced; at
assembly the rows of each item must match the request's placeholder tokens
(:func:`check_placeholders`, on the layout SGLang's processor builds) — on
a mismatch the model path raises for the whole batch
(``mm_schedule._adjust_embedding_length``) and the scheduler process exits,
which SGLang 0.5.23 itself prevents only through its processors'
``get_validated_mm_data``.  Any of these fails that request
alone (SGLang's FAIL status, the reason sent to its client), with every
pool block returned.

TP group: the scheduler ranks of one language instance share one TP group
identity (``LanguageEndpoint(tp_group=...)``; an encoder keeps a room to the
group that asked first).  :func:`instance_group` makes it: the first rank of
the instance to need it writes a random id into the store of the instance's
``torch.distributed`` WORLD (``compare_set`` on the default process group's
store: the rendezvous every rank of one server joins, on every node;
ordinary ``--dp-size`` replicas have WORLDs of their own), every other rank
reads that id back.  ``extra["tp_group"]`` in the options, or
``EMBRESUME_TP_GROUP``, overrides it (the same value on every rank of an
instance and a different one per instance).

Enable with ``EMBRESUME_SGLANG=1`` in the environment of the encoder and the
language instances (the plugin is inert otherwise); options come from the JSON
object in ``EMBRESUME_SGLANG_OPTIONS`` (keys: :data:`OWN_KEYS` and every
:class:`~embresume.Config` field).  The entry point (pyproject)::

    [project.entry-points."sglang.srt.plugins"]
    embresume = "embresume.integrations.sglang:register"

Limits (SGLang 0.5.23): only ``zmq_to_scheduler`` is covered (HTTP and gRPC
encoders: ``WaitingZmqRequestGrpc`` is replaced the same way);
``zmq_to_tokenizer`` sends to the tokenizer, which this plugin leaves alone
(its deliveries keep their ZeroMQ payload), ``mooncake`` has its own RDMA
path.  Enable the plugin on the encoder and the language instances alike: a
language instance without it cannot read a part whose payload went through
embresume (SGLang fails such requests), while one with it still reads plain
ZeroMQ parts.  An encoder started with ``--dp-size`` > 1 runs its ``MMEncoder`` in processes
started by ``sglang.srt.disaggregation.encoder.runtime.launch_dp_worker``,
which never calls ``sglang.srt.plugins.load_plugins()``, so no hook can reach
them — those encoders keep plain ZeroMQ (the language side handles both).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from typing import Optional

import torch

from ..config import Config, parse_dtype
from ..errors import EmbResumeError, TransferFailed
from ..status import Status
from ._common import ZeroSides, advertised_address, as_address_list, build_config, describe

log = logging.getLogger("embresume.integrations.sglang")

ENABLE_ENV = "EMBRESUME_SGLANG"
OPTIONS_ENV = "EMBRESUME_SGLANG_OPTIONS"

DEFAULT_ENCODER_ADDRESS = "tcp://127.0.0.1:17600"

OWN_KEYS = {
    "encoder_address": "encoder: tcp://host:port its EncoderEndpoint binds (default tcp://127.0.0.1:17600; "
                       "a non-loopback address needs auth_key)",
    "advertise_address": "encoder: the address the schedulers connect to (default: encoder_address, "
                         "0.0.0.0 replaced by this host's IP)",
    "send_timeout": "encoder: seconds a delivery waits for all ranks (default: request_timeout)",
    "encoder_addresses": "language: the encoders' advertised addresses (a list or comma-separated) a "
                         "scheduler may connect to; a part naming any other fails its request (default: "
                         "EMBRESUME_ENCODER_ADDRESSES, else encoder_endpoint, tcp://127.0.0.1:17600)",
    "max_part_tokens": "language: the most embedding rows one part may announce (default 1048576)",
    "max_hidden_size": "language: the widest embedding a part may announce while hidden_size is not set "
                       "(default 65536)",
}

#: the allow-list of encoder addresses, when the options do not set encoder_addresses
ADDRESSES_ENV = "EMBRESUME_ENCODER_ADDRESSES"
DEFAULT_MAX_PART_TOKENS = 1 << 20
DEFAULT_MAX_HIDDEN_SIZE = 1 << 16
#: the dtypes a part may announce (an embedding is a float tensor)
PART_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: attributes added to SGLang's EmbeddingData metadata part
ROOM_ATTR, ENCODER_ATTR = "embresume_room", "embresume_encoder"

SERVER_MODULE = "sglang.srt.disaggregation.encoder.server"
RECEIVER_MODULE = "sglang.srt.disaggregation.encoder.receiver"


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def options() -> dict:
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{OPTIONS_ENV} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object, got {raw!r}")
    return value


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: registers the two class
    replacements (inert unless ``EMBRESUME_SGLANG=1``).  SGLang applies them
    with ``HookRegistry.apply_hooks()`` right after loading its plugins."""
    if not enabled():
        log.debug("embresume SGLang plugin loaded but %s is not set: inert", ENABLE_ENV)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{SERVER_MODULE}.ZmqDelivery", delivery_class(), HookType.REPLACE)
    HookRegistry.register(f"{RECEIVER_MODULE}.WaitingZmqRequest", waiting_class(), HookType.REPLACE)
    HookRegistry.register(f"{RECEIVER_MODULE}.WaitingZmqRequestGrpc", waiting_grpc_class(), HookType.REPLACE)


# ------------------------------------------------------------------ encoder side
_enc_lock = threading.Lock()
_enc_state: dict = {}


def _encoder_endpoint(width: int, dtype: torch.dtype):
    """The process's EncoderEndpoint, created on the first embedding (its width
    and dtype become the layout unless the options set them); None when this
    embedding does not fit that layout."""
    with _enc_lock:
        if "error" in _enc_state:
            return None                         # reported once; SGLang's ZeroMQ path carries the payloads
        st = _enc_state.get("ep")
        if st is None:
            try:
                opts = options()
                bind = opts.get("encoder_address", DEFAULT_ENCODER_ADDRESS)
                cfg = build_config(opts, hidden_size=width, dtype=dtype, encoder_endpoint=bind,
                                   own_keys=OWN_KEYS, what=OPTIONS_ENV)
                from ..encoder import EncoderEndpoint
                ep = EncoderEndpoint(cfg)
            except Exception as e:
                _enc_state["error"] = describe(e)
                log.error("embresume: no encoder endpoint (%s); embeddings go over SGLang's ZeroMQ path",
                          describe(e))
                return None
            advertise = opts.get("advertise_address") or advertised_address(ep.address)
            timeout = float(opts.get("send_timeout", cfg.request_timeout))
            st = _enc_state["ep"] = (ep, advertise, timeout, parse_dtype(cfg.dtype))
            log.info("embresume SGLang encoder endpoint %s (advertised as %s)", ep.address, advertise)
        ep, advertise, timeout, layout_dtype = st
        if width != ep.config.hidden_size or dtype != layout_dtype:
            log.warning("embresume: a [*, %d] %s embedding does not fit the endpoint's [*, %d] %s layout: "
                        "it goes over SGLang's ZeroMQ path", width, dtype, ep.config.hidden_size, layout_dtype)
            return None
        return st


def _close_encoder_endpoint() -> None:
    with _enc_lock:
        _enc_state.pop("error", None)
        st = _enc_state.pop("ep", None)
    if st is not None:
        st[0].close()


_delivery_cache: dict = {}


def delivery_class():
    """``ZmqDelivery`` subclass sending the payload with embresume."""
    from sglang.srt.disaggregation.encoder import server

    base = server.ZmqDelivery
    if getattr(base, "_embresume", False):
        return base
    if "class" in _delivery_cache:
        return _delivery_cache["class"]

    class EmbresumeZmqDelivery(base):
        _embresume = True
        _sides = ZeroSides()

        def __init__(self, encoder, *, cleanup_receive_state: bool) -> None:
            super().__init__(encoder, cleanup_receive_state=cleanup_receive_state)
            self._rooms: dict[str, asyncio.Future] = {}
            self._rooms_lock = asyncio.Lock()

        async def send(self, state, destination) -> None:
            # cleanup_receive_state is True exactly for zmq_to_scheduler: the
            # other ZeroMQ backend (zmq_to_tokenizer) keeps its payload frames
            if not self.cleanup_receive_state:
                return await super().send(state, destination)
            mm_data = await self.encoder._wait_for_embedding(state)
            emb = mm_data.embedding
            if mm_data.error_msg is not None or emb is None or emb.dim() != 2 or emb.shape[0] == 0:
                return await super().send(state, destination)
            st = _encoder_endpoint(int(emb.shape[1]), emb.dtype)
            if st is None:
                return await super().send(state, destination)
            ep, advertise, timeout, _ = st
            room = str(state.req_id)
            async with self._rooms_lock:
                if room in self._rooms:
                    done = self._rooms[room]
                else:
                    done = self._rooms[room] = asyncio.get_running_loop().create_future()
                    try:
                        await self._register(ep, room, emb, done)
                    except Exception as e:
                        self._rooms[room] = done = None     # every rank of this part takes ZeroMQ
                        log.warning("embresume: %s not registered (%s): sending it over ZeroMQ", room, describe(e))
            if done is None:
                return await super().send(state, destination)
            marker = mm_data.copy_without_embedding()
            setattr(marker, ROOM_ATTR, room)
            setattr(marker, ENCODER_ATTR, advertise)
            # SGLang's own control path carries the metadata; a one-element
            # stand-in keeps its framing (the receiver ignores that frame)
            stub = torch.zeros(1, dtype=emb.dtype)
            marker.embedding = stub
            await self.encoder._send(stub, marker, url=destination.endpoint)
            status = await asyncio.wait_for(asyncio.shield(done), timeout + 5.0)
            if status is not Status.Success:
                raise RuntimeError(f"embresume transfer of {room} ended {status.name} (reason in the encoder log)")

        async def _register(self, ep, room: str, emb: torch.Tensor, done: asyncio.Future) -> None:
            if emb.is_cuda:
                # the encoder's stream may still be writing it: sync off the event loop
                await asyncio.to_thread(torch.cuda.synchronize, emb.device)
            fill, mrope = self._sides.get(emb.shape[0], emb.device)
            loop = asyncio.get_running_loop()

            def on_done(_room, status) -> None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(status))

            ep.send_tensors(room, emb.contiguous(), fill, mrope, on_done=on_done)

        async def release(self, state) -> None:
            async with self._rooms_lock:
                self._rooms.pop(str(state.req_id), None)
            await super().release(state)

    EmbresumeZmqDelivery.__qualname__ = EmbresumeZmqDelivery.__name__
    EmbresumeZmqDelivery.__module__ = __name__
    _delivery_cache["class"] = EmbresumeZmqDelivery
    return EmbresumeZmqDelivery


# ------------------------------------------------------------------ scheduler side
_lang_lock = threading.Lock()
_lang_endpoints: dict = {}


def current_tp_rank() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel
        rank = get_parallel().tp_rank
        return int(rank) if rank is not None else 0
    except Exception:
        return 0


#: the key, in the store of the instance's torch.distributed WORLD, under which
#: the instance's TP group identity is agreed
GROUP_STORE_KEY = "embresume/sglang/tp_group"
GROUP_ENV = "EMBRESUME_TP_GROUP"
_group_lock = threading.Lock()
_group_cache: dict = {}


def instance_group() -> Optional[str]:
    """The TP group identity of this SGLang server instance: identical on every
    scheduler rank of the instance (every node of it too), different for every
    other instance.  Agreed once per process through the store of the
    instance's ``torch.distributed`` WORLD (SGLang's scheduler initializes it
    before it receives anything): the first rank writes ``sglang-<uuid4>``
    there with ``compare_set``, the others read it.  Without an initialized
    WORLD: a process of a TP size 1 instance is the instance (a uuid of its
    own); otherwise None (embresume's default group, with a warning)."""
    with _group_lock:
        if "group" not in _group_cache:
            _group_cache["group"] = _derive_group()
        return _group_cache["group"]


def _derive_group() -> Optional[str]:
    mine = f"sglang-{uuid.uuid4().hex}"
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store
            got = _get_default_store().compare_set(GROUP_STORE_KEY, "", mine)
            got = got.decode() if isinstance(got, (bytes, bytearray)) else str(got)
            if got:
                return got
    except Exception as e:
        log.warning("embresume: no TP group identity from the torch.distributed store (%s)", describe(e))
    try:
        from sglang.srt.runtime_context import get_parallel
        if int(get_parallel().tp_size) == 1:
            return mine
    except Exception:
        pass
    log.warning("embresume: this SGLang scheduler has no TP group identity (torch.distributed is not "
                "initialized): its ranks use embresume's default group; set extra['tp_group'] in %s "
                "or %s (the same on every rank of the instance) to give them one", OPTIONS_ENV, GROUP_ENV)
    return None


def _group_overridden(cfg) -> bool:
    """An explicit group in the options' extra or the environment wins
    (LanguageEndpoint resolves it when given tp_group=None)."""
    return bool(cfg.extra.get("tp_group") or os.environ.get(GROUP_ENV))


def language_endpoint(tp_rank: int, width: int, dtype: torch.dtype):
    """This process's LanguageEndpoint for ``tp_rank`` (created on the first
    part with the part's width and dtype unless the options set them), in the
    instance's TP group (:func:`instance_group`, unless the options'
    ``extra["tp_group"]`` or ``EMBRESUME_TP_GROUP`` name one)."""
    with _lang_lock:
        ep = _lang_endpoints.get(tp_rank)
        if ep is None:
            opts = {k: v for k, v in options().items() if k not in OWN_KEYS}
            cfg = build_config(opts, hidden_size=width, dtype=dtype, what=OPTIONS_ENV)
            group = None if _group_overridden(cfg) else instance_group()
            from ..language import LanguageEndpoint
            ep = _lang_endpoints[tp_rank] = LanguageEndpoint(cfg, tp_rank=tp_rank, connect=False, tp_group=group)
            log.info("embresume SGLang rank %d: TP group %s", tp_rank,   # the value may be a secret
                     "from the options" if group is None and ep.tp_group else
                     "of this instance" if ep.tp_group else "none (embresume's default)")
        return ep


def close_language_endpoints() -> None:
    with _lang_lock:
        eps = list(_lang_endpoints.values())
        _lang_endpoints.clear()
    for ep in eps:
        ep.close()


class PartRefused(ValueError):
    """A part (or the embedding it brought) that this scheduler rank does not
    take: its request fails with this reason, nothing else does."""


def _address_key(address: str):
    """``tcp://Host:port`` compared by scheme, lower-case host and port."""
    from urllib.parse import urlsplit
    try:
        u = urlsplit(address.strip())
        if u.scheme and u.hostname and u.port:
            return u.scheme.lower(), u.hostname.lower(), u.port
    except ValueError:
        pass
    return address.strip()


def receive_limits() -> dict:
    """What a scheduler rank accepts from a part, from the options and the
    environment (read on every part: a part is never trusted to say it):
    ``allowed`` (address key -> address: ``encoder_addresses``, else
    ``EMBRESUME_ENCODER_ADDRESSES``, else ``encoder_endpoint``),
    ``max_tokens``, ``hidden_size`` (exact, when the options set it) or
    ``max_hidden``, and ``dtype`` (exact, when the options set it)."""
    opts = options()
    raw = opts.get("encoder_addresses")
    if raw is None:
        raw = os.environ.get(ADDRESSES_ENV, "").strip() or None
    if raw is None:
        raw = opts.get("encoder_endpoint") or Config.__dataclass_fields__["encoder_endpoint"].default
    allowed = {_address_key(a): a for a in as_address_list(raw)}
    hidden = opts.get("hidden_size")
    dtype = opts.get("dtype")
    return {"allowed": allowed,
            "max_tokens": int(opts.get("max_part_tokens", DEFAULT_MAX_PART_TOKENS)),
            "hidden_size": int(hidden) if hidden is not None else None,
            "max_hidden": int(opts.get("max_hidden_size", DEFAULT_MAX_HIDDEN_SIZE)),
            "dtype": parse_dtype(dtype) if dtype is not None else None}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_part(recv_obj, rid: str, limits: dict) -> tuple:
    """``(room, encoder, tokens, width, dtype)`` of a marked part, or
    :class:`PartRefused`: every value a part carries (it arrives on the
    scheduler's ZeroMQ receive port, so anyone who reaches that port can
    write it) is checked before it reaches a ``connect()`` or an allocation."""
    from sglang.srt.disaggregation.encoder.receiver import create_part_req_id

    room = getattr(recv_obj, ROOM_ATTR, None)
    part_idx = getattr(recv_obj, "part_idx", None)
    if not _is_int(part_idx) or part_idx < 0:
        raise PartRefused(f"part_idx {part_idx!r} is not an index")
    if not isinstance(room, str) or room != create_part_req_id(rid, part_idx):
        raise PartRefused(f"the part names room {_short(room)}, not part {part_idx} of request {rid!r}")
    encoder = getattr(recv_obj, ENCODER_ATTR, None)
    if not isinstance(encoder, str) or len(encoder) > 512 or _address_key(encoder) not in limits["allowed"]:
        log.info("embresume: allowed encoder addresses: %s", sorted(limits["allowed"].values()))
        raise PartRefused(f"the part names the encoder {_short(encoder)}, which is not one of this instance's "
                          f"encoder addresses (encoder_addresses in {OPTIONS_ENV}, or {ADDRESSES_ENV}); "
                          "nothing was dialled")
    shape = getattr(recv_obj, "shape", None)
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(_is_int(x) for x in shape):
        raise PartRefused(f"the part's shape {_short(shape)} is not [tokens, width]")
    tokens, width = shape
    if not 1 <= tokens <= limits["max_tokens"]:
        raise PartRefused(f"the part announces {tokens} embedding rows, the limit is {limits['max_tokens']} "
                          "(max_part_tokens)")
    if limits["hidden_size"] is not None:
        if width != limits["hidden_size"]:
            raise PartRefused(f"the part announces width {width}, this instance's hidden_size is "
                              f"{limits['hidden_size']}")
    elif not 1 <= width <= limits["max_hidden"]:
        raise PartRefused(f"the part announces width {width}, the limit is {limits['max_hidden']} "
                          "(max_hidden_size; or set hidden_size)")
    dtype = getattr(recv_obj, "dtype", None)
    if dtype not in PART_DTYPES or (limits["dtype"] is not None and dtype != limits["dtype"]):
        want = limits["dtype"] or ", ".join(str(d) for d in PART_DTYPES)
        raise PartRefused(f"the part announces dtype {_short(dtype)}, this instance takes {want}")
    return room, encoder, tokens, width, dtype


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_placeholders(output, embeddings, rid: str) -> None:
    """The encoder's embedding rows against the request's placeholder tokens:
    every multimodal item of the layout the processor built (one span of
    placeholder tokens per item) gets exactly as many rows as it has tokens,
    and the items of a modality take every row received for it.  Raises
    :class:`PartRefused` otherwise, before the layout reaches SGLang's
    scheduler (its model would fail on the mismatch, for the whole batch)."""
    items = getattr(output, "mm_items", None)
    if items is None:
        raise PartRefused(f"embresume: the processor's layout of request {rid!r} has no multimodal items")
    consumed = {m: 0 for m in embeddings}
    for i, item in enumerate(items):
        emb = getattr(item, "precomputed_embeddings", None)
        if not isinstance(emb, torch.Tensor):
            continue                                  # SGLang's own validation refuses it
        rows, name = int(emb.shape[0]), getattr(item.modality, "name", str(item.modality)).lower()
        offsets = getattr(item, "offsets", None)
        if offsets:
            want = sum(int(end) - int(start) + 1 for start, end in offsets)
            if rows != want:
                raise PartRefused(f"embresume: {name} item {i} of request {rid!r} has {want} placeholder tokens, "
                                  f"the encoder's embedding gives it {rows} rows")
        if item.modality in consumed:
            consumed[item.modality] += rows
    for modality, emb in embeddings.items():
        if isinstance(emb, torch.Tensor) and consumed[modality] != int(emb.shape[0]):
            name = getattr(modality, "name", str(modality)).lower()
            raise PartRefused(f"embresume: the encoder sent {int(emb.shape[0])} {name} embedding rows for request "
                              f"{rid!r}, its placeholder tokens take {consumed[modality]}")


class _PlaceholderCheck:
    """SGLang's multimodal processor as ``_finish_assemble`` sees it: its
    ``get_validated_mm_data`` builds the layout with the processor's
    ``get_mm_data``, runs :func:`check_placeholders`, then SGLang's own
    validation (what ``BaseMultimodalProcessor.get_validated_mm_data`` does in
    SGLang 0.5.23); everything else is the processor's."""

    def __init__(self, processor, rid: str) -> None:
        self._processor, self._rid = processor, rid

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def get_validated_mm_data(self, prompt, embeddings, **kwargs):
        output = self._processor.get_mm_data(prompt, embeddings, **kwargs)
        check_placeholders(output, embeddings, self._rid)
        validate = getattr(self._processor, "_validate_precomputed_embedding_layout", None)
        if validate is not None:
            validate(output, embeddings)
        return output


def _release_quietly(res) -> None:
    try:
        if not res.released:
            res.release()
    except Exception as e:  # pragma: no cover - a release failing is a bug
        log.warning("embresume: releasing a refused result failed: %s", describe(e))


_waiting_cache: dict = {}


def waiting_class():
    """``WaitingZmqRequest`` subclass receiving marked parts with embresume."""
    return _waiting_classes()[0]


def waiting_grpc_class():
    """The same for ``WaitingZmqRequestGrpc`` (gRPC encoders)."""
    return _waiting_classes()[1]


def _waiting_classes():
    from sglang.srt.disaggregation.encoder import receiver

    if "classes" in _waiting_cache:
        return _waiting_cache["classes"]
    aggregate = receiver._aggregate_embedding_part
    PENDING = receiver.WaitingMMRequestStatus.PENDING
    safe_loads = receiver.safe_pickle_loads

    class EmbresumeReceiveMixin:
        """The embresume receive path, mixed into SGLang's waiting-request classes."""

        _embresume = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._er_tp_rank = current_tp_rank()
            self._er_pending: dict = {}          # room -> (endpoint, metadata part)

        def consume_parts(self, parts) -> None:
            if self.status != PENDING:
                return
            try:
                recv_obj = safe_loads(parts[0])
            except Exception:
                return super().consume_parts(parts)    # SGLang fails it with its own message
            room = getattr(recv_obj, ROOM_ATTR, None)
            if room is None:
                return super().consume_parts(parts)
            if not self._is_valid_embedding_part(recv_obj):
                return
            try:
                room, encoder, tokens, width, dtype = check_part(recv_obj, self.recv_req.rid, receive_limits())
            except PartRefused as e:
                log.warning("embresume part of %s refused: %s", self.rid, str(e))
                self._fail_and_release(f"embresume part refused: {e}")
                return
            except Exception as e:                  # options that do not parse: this request fails
                log.warning("embresume part of %s not checked: %s", self.rid, describe(e))
                self._fail_and_release(f"embresume part not checked: {describe(e)}")
                return
            try:
                ep = language_endpoint(self._er_tp_rank, width, dtype)
                if ep.config.hidden_size != width or parse_dtype(ep.config.dtype) != recv_obj.dtype:
                    raise ValueError(f"part is [{tokens}, {width}] {recv_obj.dtype}, this rank's embresume pool "
                                     f"is [*, {ep.config.hidden_size}] {ep.config.dtype}")
                ep.request(room, int(self.receive_count), encoder=encoder, expected_tokens=tokens)
                self._er_pending[room] = (ep, recv_obj)
            except Exception as e:
                log.warning("embresume receive of %s not started: %s", room, describe(e))
                self._fail_and_release(f"embresume receive not started: {describe(e)}")
                return
            self._er_poll()

        def _try_recv_mm_data(self):
            self._er_poll()
            super()._try_recv_mm_data()
            self._er_poll()

        def _er_poll(self) -> None:
            for room, (ep, recv_obj) in list(self._er_pending.items()):
                if self.status != PENDING:
                    return
                try:
                    st = ep.poll(room)
                    if st not in (Status.Success, Status.Failed):
                        continue
                    del self._er_pending[room]
                    res = ep.result(room)
                except TransferFailed as e:
                    self._fail_and_release(f"embresume transfer failed: {e}")
                    return
                except EmbResumeError as e:
                    self._er_pending.pop(room, None)
                    self._fail_and_release(f"embresume transfer failed: {describe(e)}")
                    return
                try:
                    emb = res.embeddings
                    if list(emb.shape) != list(recv_obj.shape) or emb.dtype != recv_obj.dtype:
                        raise PartRefused(f"the transfer brought {tuple(emb.shape)} {emb.dtype}, the part's "
                                          f"metadata says {tuple(recv_obj.shape)} {recv_obj.dtype}")
                    if ep.config.zero_copy:
                        emb = emb.clone()
                        res.release()
                    recv_obj.embedding = emb
                    self.recv_embedding_data = aggregate(self.recv_embedding_data, recv_obj, self.model_type)
                except Exception as e:
                    # no view of the pool may outlive the release (a log record
                    # that keeps the traceback keeps this frame and its locals)
                    emb = None
                    _release_quietly(res)
                    why = str(e) if isinstance(e, PartRefused) else describe(e)
                    if isinstance(e, PartRefused):
                        log.warning("embresume part %s not usable: %s", room, why)
                    else:
                        log.exception("embresume part %s not usable", room)
                    self._fail_and_release(f"embresume part not usable: {why}")
                    return
                if self.recv_embedding_data.ready and self._assemble_mm_inputs_from_embeddings():
                    self.close_recv_socket()

        def _finish_assemble(self, recv_embedding) -> None:
            # the layout is checked against the embedding before SGLang publishes it
            # (a failure goes SGLang's way: _fail_assemble, FAIL, the request aborted)
            processor = self.mm_processor
            self.mm_processor = _PlaceholderCheck(processor, self.rid)
            try:
                super()._finish_assemble(recv_embedding)
            finally:
                self.mm_processor = processor

        def release_resources(self):
            pending, self._er_pending = getattr(self, "_er_pending", {}), {}
            for room, (ep, _) in pending.items():
                try:
                    ep.abort(room, "the SGLang request ended")
                    ep.result(room).release()
                except EmbResumeError:
                    pass
            super().release_resources()

    def subclass(base):
        if getattr(base, "_embresume", False):
            return base
        name = f"Embresume{base.__name__}"
        cls = type(name, (EmbresumeReceiveMixin, base), {"__module__": __name__, "__qualname__": name})
        return cls

    classes = (subclass(receiver.WaitingZmqRequest), subclass(receiver.WaitingZmqRequestGrpc))
    _waiting_cache["classes"] = classes
    return classes
