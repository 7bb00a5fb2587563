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

from ..config import parse_dtype
from ..errors import EmbResumeError, TransferFailed
from ..status import Status
from ._common import ZeroSides, advertised_address, build_config, describe

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
}

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
            try:
                if not self._is_valid_embedding_part(recv_obj):
                    return
                encoder = str(getattr(recv_obj, ENCODER_ATTR))
                tokens, width = (int(x) for x in recv_obj.shape)
                ep = language_endpoint(self._er_tp_rank, width, recv_obj.dtype)
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
                    if list(emb.shape) != [int(x) for x in recv_obj.shape]:
                        raise ValueError(f"received {tuple(emb.shape)}, the part says {tuple(recv_obj.shape)}")
                    if ep.config.zero_copy:
                        emb = emb.clone()
                        res.release()
                    recv_obj.embedding = emb
                    self.recv_embedding_data = aggregate(self.recv_embedding_data, recv_obj, self.model_type)
                except Exception as e:
                    logging.getLogger(__name__).exception("embresume part %s not usable", room)
                    self._fail_and_release(f"embresume part not usable: {describe(e)}")
                    return
                if self.recv_embedding_data.ready and self._assemble_mm_inputs_from_embeddings():
                    self.close_recv_socket()

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
