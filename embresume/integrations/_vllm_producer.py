"""The producer's roles: the scheduler names the items requests need published and
answers ``ec_transfer_params``; TP rank 0's worker publishes every encoder output with its
:class:`~embresume.EncoderEndpoint` through the bounded :class:`Publisher`."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections import OrderedDict
from typing import Any, Optional

import torch

from ..errors import EmbResumeError
from ._common import ZeroSides, unpinned
from ._vllm_base import (PARAM_KEY, Counters, EmbresumeECMetadata, Role, dtype_name, metadata_resolver,
                         uncomputed)

log = logging.getLogger("embresume.integrations.vllm")


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
        # vLLM's CPU build pins this (the worker's) thread: the endpoint's threads must not
        # inherit that, or they share the pinned cores with spinning engine workers
        with unpinned(self.opts.unpin_threads):
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
            if self.withdraw(room):
                return True
        return False                 # every held item is being sent: over the bound until one ends

    def withdraw(self, room: str) -> bool:
        """Let go of ``room`` (on the publisher's thread; past max_bytes, the least recently
        published first): consumers asking for it are answered NOT_PUBLISHED.  False, changing
        nothing, while it is being sent."""
        if not self._enc.withdraw(room):
            return False
        self._drop(room)
        self._counters.add("items_withdrawn")
        return True

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
            return                   # withdrawn (evicted past max_bytes): let go already
        # delivered, failed, or nobody asked within request_timeout: published again while
        # it is held (max_bytes bounds what is held, least recently published out), so a
        # request that waited in a consumer's queue longer than request_timeout still finds
        # its item; only a closed endpoint lets go of everything
        if not self._register(room, tensor):
            self._drop(room)

    def _drop(self, room: str) -> None:
        tensor = self._held.pop(room, None)
        if tensor is not None:
            self._bytes -= tensor.numel() * tensor.element_size()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

