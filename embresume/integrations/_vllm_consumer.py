"""The consumer's roles for ``receive="scheduler"`` (the default): the landing scheduler
(receive endpoints, the landing region, the pure :class:`~._items.ItemTracker`, the mirror
of vLLM's encoder cache, the items held in the receive pool) and the landing worker (maps
the region and the receive pools, copies into ``encoder_cache``);
:class:`_ConsumerScheduler` is what both consumer schedulers share (routing within the
allow-list, recompute decisions, the loud failure line)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..errors import ConfigError, EmbResumeError, InvalidArgument, RoomInUse, TransferFailed
from ..kernels.cpu import copy_tensor
from ..status import Status
from . import _items as I
from ._common import describe, pick_encoder, unpinned
from ._vllm_base import (MAX_WIDTHS, PARAM_KEY, EmbresumeECMetadata, EmbresumeECWorkerMetadata, Role,
                         discard, metadata_resolver, param_entry, uncomputed)

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("embresume.integrations.vllm")


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
        self._refusals: set[tuple[str, str]] = set()    # (request, item) whose params were refused
        self._refusal_logged = -1e9
        self._alarm = FailureAlarm()

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
            self._refusals.discard((request.request_id, feature.identifier))

    def take_unavailable_requests(self) -> set:
        out, self._unavailable = self._unavailable, set()
        if out:
            self.counters.add("unavailable", len(out))
        return out

    def _ask(self, request: "Request", h: str) -> tuple[Optional[str], int, str]:
        """(encoder, width, refusal) of item ``h``: whom to ask, at which width, or why the
        request's ``ec_transfer_params`` are refused.  Those come from the client (the OpenAI
        server copies them into the request): an encoder they name must be in the allow-list
        (``encoder_addresses``, ``allowed_encoders``) and a width one of the model's own;
        a refused item is asked of nobody (no connection, no pool) and recomputed or failed.
        Without an encoder in the params, ``pick_encoder(h, encoder_addresses)`` routes it."""
        entry = param_entry(request, h)
        params = getattr(request, "ec_transfer_params", None)
        named = entry.get(PARAM_KEY) if entry is not None else None
        if not named and isinstance(params, dict):
            named = params.get(PARAM_KEY)
        encoder = None
        if named:
            if not isinstance(named, str) or named not in self.opts.allowed_encoders:
                return None, 0, f"ec_transfer_params name encoder {str(named)[:80]!r}, not an allowed one"
            encoder = named
        elif self.opts.encoders:
            encoder = pick_encoder(h, self.opts.encoders)
        width = int(self.config.hidden_size)
        announced = entry.get("width") if entry is not None else None
        if announced not in (None, 0, ""):
            try:
                width = int(announced)
            except (TypeError, ValueError):
                width = -1
            if width not in self.opts.widths:
                return None, 0, (f"ec_transfer_params announce width {str(announced)[:20]!r}, not one of the "
                                 f"model's {sorted(self.opts.widths)}")
        return encoder, width, ""

    def _refused(self, request: "Request", h: str, reason: str) -> None:
        """Count and log a refusal of ``request``'s params for ``h`` once per request and item."""
        key = (request.request_id, h)
        if key in self._refusals:
            return
        self._refusals.add(key)
        self.counters.add("params_refused")
        now = time.monotonic()
        if now - self._refusal_logged >= 10.0:
            self._refusal_logged = now
            log.warning("embresume EC consumer: request %s, item %s: %s; %s (logged at most every 10 s; "
                        "see the params_refused counter)", request.request_id, h, reason,
                        "recomputing it" if self._can_recompute_item(request, h) else "failing the request")

    def _without_embresume(self, request, feature) -> bool:
        """An item that will not come through embresume: True when vLLM may encode it itself
        (its request goes on), else the request is failed (``take_unavailable_requests``)."""
        if self._can_recompute(feature):
            return True
        self._unavailable.add(request.request_id)
        return False

    def _can_recompute_item(self, request, h: str) -> bool:
        return any(f.identifier == h and self._can_recompute(f) for f in request.mm_features)

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


#: within one scheduler step, how often the landing scheduler polls its open transfers again
PUMP_INTERVAL = 0.002

#: received items at least this large are copied into the landing region on the lander
#: thread, not on vLLM's scheduler thread (smaller ones cost less than the thread hop)
ASYNC_LAND_BYTES = 1 << 20


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` between host tensors of one dtype on the calling thread alone
    (numpy): torch's copy hands the work to its intra-op threads, and waking those
    costs milliseconds when they have slept, on a busy host up to 20 ms (a 112 KiB item: 13 us
    on one thread, 6 ms p50 through torch's pool, measured on the 2-core bench machine)."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype:
        copy_tensor(dst, src)
    else:
        dst.copy_(src)


class Lander:
    """One thread that copies received items into the landing region, off vLLM's scheduler
    thread.  The scheduler allocates (and pins) the entry, hands (key, destination, source)
    here, and collects the finished keys with :meth:`done` on its next poll; region
    bookkeeping stays on the scheduler thread."""

    def __init__(self, unpin: bool = True) -> None:
        import queue
        import threading
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._done: deque = deque()
        with unpinned(unpin):
            self._thread = threading.Thread(target=self._run, name="embresume-vllm-land", daemon=True)
            self._thread.start()

    def submit(self, key: str, dst, src) -> None:
        self._jobs.put((key, dst, src))

    def pending(self) -> bool:
        """Whether a copy finished that :meth:`done` has not handed out."""
        return bool(self._done)

    def done(self) -> list:
        """(key, error or None) of the copies finished since the last call."""
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, dst, src = job
            try:
                host_copy(dst, src)
                self._done.append((key, None))
            except Exception as e:          # reported to the scheduler: that item fails, not the thread
                self._done.append((key, describe(e)))

    def close(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


#: items held in a receive pool for the workers take at most this share of its blocks
POOL_HOLD_SHARE = 0.5
#: below this share of free blocks, unpinned items held in a pool move into the landing region
POOL_SPILL_FREE = 0.25


@dataclasses.dataclass
class PoolItem:
    """An item the workers read straight from the receive pool (``load_from_pool``): it
    arrived in one chunk in consecutive blocks, so its rows are one byte range of the pool's
    memfd; the result (its lease on those blocks) is kept until the item is let go."""

    res: Any
    ep: Any                      # the endpoint whose pool holds it
    region: tuple                # (pid, fd, size) of that pool's memfd
    offset: int                  # byte offset of its rows in the memfd
    shape: tuple
    dtype: str
    blocks: int                  # pool blocks it holds
    pins: int = 0


def pool_place(ep, emb: torch.Tensor) -> Optional[tuple]:
    """((pid, fd, size), byte offset) of ``emb`` inside ``ep``'s receive pool, where the
    workers can map it (a host pool in a memfd, ``emb`` contiguous rows of it); None
    otherwise (a merged result, a GPU pool)."""
    backing = getattr(getattr(ep, "pool", None), "backing", None)
    seg = getattr(backing, "segment", None)
    if seg is None or getattr(seg, "fd", None) is None or emb.device.type != "cpu" or not emb.is_contiguous():
        return None
    base = backing.raw.data_ptr()
    off = emb.data_ptr() - base
    if off < 0 or off + emb.numel() * emb.element_size() > backing.raw.numel():
        return None
    return (os.getpid(), int(seg.fd), int(seg.size)), off


class LandingScheduler(_ConsumerScheduler):
    """Consumer, ``receive="scheduler"``, scheduler process: one receive endpoint per item
    width, the landing region, the item tracker, and a mirror of what vLLM's encoder
    cache holds."""

    name = "consumer, scheduler (landing)"

    def __init__(self, conn, opts, counters):
        super().__init__(conn, opts, counters)
        from ._landing import LandingRegion, check_scheduler_side
        try:
            check_scheduler_side()
        except PermissionError as e:
            raise ConfigError(f"EmbresumeECConnector: {e}") from None
        self.tracker = I.ItemTracker(max_attempts=opts.max_attempts, failover_timeout=opts.failover,
                                     load_timeout=opts.load_timeout)
        self._langs: dict[int, Any] = {}
        self._results: dict[str, Any] = {}        # mm_hash -> received result, until landed
        self._landed_out: dict[str, tuple] = {}   # this step's loads
        self._next_load = 0
        self._step = 0                            # scheduler steps (build_connector_meta calls)
        self._copying: dict[str, Any] = {}        # mm_hash -> result being copied by the lander
        self._lander: Optional[Lander] = None
        self._pumped_at = -1e9
        self._eps: tuple = ()                     # the endpoints, for _changed
        self._region = LandingRegion(opts.landing_bytes)
        self._in_pool: dict[str, PoolItem] = {}   # mm_hash -> item the workers read from the pool
        with unpinned(opts.unpin_threads):
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
        # vLLM calls this for every request with media of a step (running ones included): what
        # finished (transfers, lander copies) is taken up at once; the open transfers' clocks are
        # looked at the end of each step (build_connector_meta) and here when PUMP_INTERVAL has
        # passed since, not once per call
        if time.monotonic() - self._pumped_at >= PUMP_INTERVAL:
            self._pump()
        elif self._changed():
            self._pump(full=False)
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
                encoder, width, refusal = self._ask(request, h)
                if refusal:
                    self._refused(request, h, refusal)
                    ready &= self._without_embresume(request, feature)
                    continue
                if encoder is None:
                    continue                   # nobody to ask: vLLM encodes it itself
                need = I.Need(request.request_id, h, encoder, int(request.get_num_encoder_embeds(index)),
                              width, now)
            else:
                need = I.Need(request.request_id, h, "", 0, 0, now)
            self._run(self.tracker.handle(need))
            phase = self.tracker.phase(h)
            if phase in (I.P.LANDED, I.P.PINNED):
                continue
            if phase is I.P.FAILED and self._without_embresume(request, feature):
                continue                       # has_cache_item says no: vLLM encodes it locally
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
            if failed:
                self._alarm.recomputed(h)
            self._run(self.tracker.handle(I.LocalEncode(rid, h)))
            return
        load_id = None
        if h not in self._landed_out:
            load_id = self._next_load
            self._next_load += 1
            p = self._in_pool.get(h)
            if p is not None:
                self._landed_out[h] = (load_id, p.offset, p.shape, p.dtype, p.region)
            else:
                e = self._region.get(h)
                self._landed_out[h] = (load_id, e.offset, e.shape, e.dtype, None)
        self._run(self.tracker.handle(I.Alloc(rid, h, load_id, self.opts.load_reports,
                                              self.opts.load_lease_steps)))

    def build_connector_meta(self, scheduler_output) -> EmbresumeECMetadata:
        self._mirror_evicted(scheduler_output)
        self._pump()
        self._step += 1
        self._run(self.tracker.handle(I.StepEnd()))
        if self._in_pool:
            self._pool_sweep()
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

    def gauges(self) -> dict:
        t = self.tracker
        return {"items_in_flight": sum(t.count(ph) for ph in (I.P.PENDING, I.P.TRANSFERRING, I.P.RETRY_WAIT,
                                                               I.P.RECEIVED)),
                "pool_blocks_used": sum(ep.layout.num_blocks - ep.allocator.free_blocks for ep in self._langs.values()),
                "landing_bytes_used": self._region.used,
                "pool_items_held": len(self._in_pool),
                "landing_items_pinned": t.count(I.P.PINNED)}

    def close(self) -> None:
        if self._lander is not None:
            self._lander.close()
        for res in self._copying.values():
            if not res.released:
                res.release()
        self._copying.clear()
        for p in self._in_pool.values():
            if not p.res.released:
                p.res.release()
        self._in_pool.clear()
        for res in self._results.values():
            if not res.released:
                res.release()
        self._results.clear()
        for ep in self._langs.values():
            try:
                ep.close()
            except Exception:
                log.debug("closing an embresume endpoint failed", exc_info=True)
        self._region.close()

    # ------------------------------------------------------------ the tracker's actions
    def _changed(self) -> bool:
        """Whether a transfer or a lander copy finished since the last :meth:`_pump` (a few
        attribute reads: vLLM's scheduler makes this call for every request, every step)."""
        if self._copying and self._lander.pending():
            return True
        for ep in self._eps:
            if ep.finished_pending():
                return True
        return False

    def _pump(self, full: bool = True) -> None:
        """Take up what finished: the lander's copies, then the transfers the endpoints
        report finished (each polled once, never all open ones).  ``full``: also the
        open transfers' clocks (those past their failover time or deadline are polled: their
        status decides), due retries and the tracker's other timeouts."""
        now = time.monotonic()
        if full:
            self._pumped_at = now
        if self._copying:
            for h, error in self._lander.done():
                self._run(self._copied(h, error))
        for ep in self._eps:
            for h in ep.take_finished():
                it = self.tracker.get(h)
                if it is not None and it.phase is I.P.TRANSFERRING and self._langs.get(it.width, self._lang) is ep:
                    self._poll_one(it, ep, now)
        if not full or not self.tracker.busy():
            return
        failover = self.tracker.failover_timeout
        for it in self.tracker.in_phase(I.P.TRANSFERRING):
            if now > it.deadline or now > it.started + failover:
                self._poll_one(it, self._langs.get(it.width, self._lang), now)
        self._run(self.tracker.handle(I.Tick(now)))

    def _poll_one(self, it: I.Item, lang, now: float) -> None:
        try:
            st = lang.poll(it.mm_hash)
        except EmbResumeError as e:
            self._run(self.tracker.handle(I.Polled(it.mm_hash, now, Status.Failed, getattr(e, "code", None),
                                                   describe(e))))
            return
        if self.tracker.poll_matters(it, st, now):   # most polls change nothing: no event
            self._run(self.tracker.handle(self._polled(it, lang, st, now)))

    def _polled(self, it: I.Item, lang, st: Status, now: float) -> I.Polled:
        h = it.mm_hash
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
                if res is not None and a.mm_hash not in self._copying:
                    res.release()                  # (a copy in flight releases it when done)
            elif isinstance(a, I.Pin):
                p = self._in_pool.get(a.mm_hash)
                if p is not None:
                    p.pins += 1
                else:
                    self._region.pin(a.mm_hash)
            elif isinstance(a, I.Unpin):
                p = self._in_pool.get(a.mm_hash)
                if p is not None:
                    p.pins = max(0, p.pins - 1)
                    todo.extend(self._pool_let_go(a.mm_hash))
                else:
                    self._region.unpin(a.mm_hash)
            elif isinstance(a, I.Retrying):
                self.counters.add("failovers")
                log.info("embresume EC transfer of %s: attempt %d failed (%s); trying again",
                         a.mm_hash, a.attempt, a.reason)
            elif isinstance(a, I.GaveUp):
                self.counters.add("transfer_failures")
                self._alarm.failed(a.reason)
                log.warning("embresume EC transfer of %s failed after %d attempt(s) (%s): %s", a.mm_hash,
                            a.attempts, "recomputing where the media is at hand"
                            if self.opts.on_failure == "recompute" else "failing its requests", a.reason)

    def _start(self, a: I.Start):
        now = time.monotonic()
        try:
            with unpinned(self.opts.unpin_threads):     # a new encoder's link starts threads
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
        if it is None or res is None or it.phase is not I.P.RECEIVED or h in self._copying:
            return []
        emb = res.embeddings
        if it.num_embeds and emb.shape[0] != it.num_embeds:
            return self.tracker.handle(I.Rejected(h, f"the encoder sent {emb.shape[0]} embeddings for {h}, "
                                                     f"the request has {it.num_embeds} placeholders"))
        if self.opts.load_from_pool and self._hold_in_pool(h, it, res):
            return self._landed(h, it, res, keep=True)
        evicted: list[str] = []
        e = self._region.alloc(h, tuple(emb.shape), self.opts.dtype,
                               evictable=lambda victim: self.tracker.evictable(victim, for_hash=h),
                               on_evict=evicted.append)
        out: list = []
        for victim in evicted:
            out += self.tracker.handle(I.Evicted(victim))
        nbytes = emb.numel() * emb.element_size()
        if e is None:
            return out + self.tracker.handle(I.NoRoom(h, time.monotonic(), never=nbytes > self._region.size))
        if nbytes >= ASYNC_LAND_BYTES:
            # pinned while the lander copies (nothing evicts or reuses it); landed on a later poll
            if self._lander is None:
                self._lander = Lander(self.opts.unpin_threads)
            self._region.pin(h)
            self._copying[h] = res
            self._lander.submit(h, self._region.tensor(e), emb)
            return out
        host_copy(self._region.tensor(e), emb)
        return out + self._landed(h, it, res)

    def _copied(self, h: str, error: Optional[str]) -> list:
        """The lander finished copying ``h``: landed, unless it is no longer wanted."""
        res = self._copying.pop(h)
        self._region.unpin(h)
        it = self.tracker.get(h)
        if error is None and it is not None and it.phase is I.P.RECEIVED and self._results.get(h) is res:
            return self._landed(h, it, res)
        self._region.discard(h)                  # dropped meanwhile (its Release waited for the copy)
        if self._results.get(h) is res:
            del self._results[h]
        if not res.released:
            res.release()
        if error is not None and it is not None and it.phase is I.P.RECEIVED:
            return self.tracker.handle(I.Rejected(h, f"copy into the landing region failed: {error}"))
        return []

    def _landed(self, h: str, it, res, keep: bool = False) -> list:
        """``h`` is in the landing region (``keep``: held in the receive pool instead, its
        result kept until :meth:`_pool_let_go`)."""
        emb = res.embeddings
        del self._results[h]
        self.counters.add("items_received")
        self.counters.add("bytes_received", emb.numel() * emb.element_size())
        self.counters.transfer(time.monotonic() - it.born)
        if res.resumes:
            self.counters.add("resumes", res.resumes)
        if keep:
            self.counters.add("items_held_in_pool")
        else:
            res.release()
        return self.tracker.handle(I.Landed(h))

    # ------------------------------------------------------------ items held in the pool
    def _hold_in_pool(self, h: str, it, res) -> bool:
        """Keep a one-chunk result where it is, for the workers to read from the pool (no
        landing copy), while the pool's held items stay within POOL_HOLD_SHARE of its blocks."""
        ep = self._langs.get(it.width, self._lang)
        emb = res.embeddings
        place = pool_place(ep, emb)
        if place is None:
            return False
        layout = ep.layout
        blocks = -(-int(emb.shape[0]) // layout.block_size)
        held = sum(p.blocks for p in self._in_pool.values() if p.ep is ep)
        if held + blocks > POOL_HOLD_SHARE * layout.num_blocks:
            return False
        self._in_pool[h] = PoolItem(res, ep, place[0], place[1], tuple(int(x) for x in emb.shape),
                                    str(emb.dtype).replace("torch.", ""), blocks)
        return True

    def _pool_let_go(self, h: str) -> list:
        """Give ``h``'s blocks back to its pool once nothing needs it there: unpinned (no load
        out) and no request waiting for it (the region's cache role is vLLM's encoder cache's
        here: an item asked for again is transferred again)."""
        p = self._in_pool.get(h)
        it = self.tracker.get(h)
        if p is None or p.pins or (it is not None and it.waiting):
            return []
        del self._in_pool[h]
        p.res.release()
        if it is not None and it.phase is I.P.LANDED:
            return self.tracker.handle(I.Evicted(h))
        return []

    def _pool_sweep(self) -> None:
        """Once a step: let go of held items nobody needs, and, where a pool runs short of free
        blocks (below POOL_SPILL_FREE), move one unpinned held item (the oldest) into the
        landing region, so new transfers are not held up for long by items that wait for their
        requests.  One a step: the copy runs on vLLM's scheduler thread (about 2 ms for 16 MB),
        and blocks given back go to waiting transfers at once, so the shortage may well last;
        the room is made only of region entries no request waits for (a waited-for item pushed
        out would be transferred again, into the short pool)."""
        for h in list(self._in_pool):
            self._run(self._pool_let_go(h))
        for h, p in list(self._in_pool.items()):
            if p.pins or p.ep.allocator.free_blocks >= POOL_SPILL_FREE * p.ep.layout.num_blocks:
                continue
            evicted: list[str] = []
            e = self._region.alloc(h, p.shape, p.res.embeddings.dtype, evictable=self.tracker.evictable,
                                   on_evict=evicted.append)
            for victim in evicted:
                self._run(self.tracker.handle(I.Evicted(victim)))
            if e is None:
                continue
            host_copy(self._region.tensor(e), p.res.embeddings)
            del self._in_pool[h]
            p.res.release()
            self.counters.add("items_spilled")
            return

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
            ep.track_finished()           # _pump reads the rooms that finished, not every open one
            self._eps = tuple(self._langs.values())
        return ep


class LandingWorker(Role):
    """Consumer, ``receive="scheduler"``, worker process: maps the landing region and copies
    each item the metadata names into ``encoder_cache``."""

    name = "consumer, worker (landing)"

    def __init__(self, conn, opts, counters, target: torch.device):
        super().__init__(conn, opts, counters)
        self._target = target
        self._view = None
        self._pool_views: dict = {}           # (pid, fd, size) of a scheduler's receive pool -> its view
        self._loaded: list[int] = []
        # the scheduler process is this worker's parent under the multiprocessing executor,
        # this process itself in-process ("uni"); other executors are checked at first use
        backend = opts.vllm_config.parallel_config.distributed_executor_backend
        scheduler = os.getppid() if backend == "mp" else os.getpid() if backend in (None, "uni") else None
        if scheduler is not None:
            from ._landing import check_worker_side
            try:
                check_worker_side(scheduler)
            except PermissionError as e:
                raise ConfigError(f"EmbresumeECConnector: {e}") from None

    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        meta = self.meta()
        if meta is None or not meta.landed:
            return
        from ._landing import LandingView
        if self._view is None or self._view.descriptor != tuple(meta.region):
            self._close_views()      # another scheduler (a restarted engine core): its pools too
            self._view = LandingView(meta.region)
        for h, (load_id, offset, shape, dtype, pool) in meta.landed.items():
            if pool is None:
                view = self._view
            else:
                # an item held in a receive pool (load_from_pool): the scheduler's pools, one
                # per item width, mapped once each (not prefaulted: a pool is GiBs)
                pool = tuple(pool)
                view = self._pool_views.get(pool)
                if view is None:
                    if len(self._pool_views) >= MAX_WIDTHS:
                        raise ValueError(f"more than {MAX_WIDTHS} receive pools named by the scheduler")
                    view = self._pool_views[pool] = LandingView(pool, prefault=False)
            src = view.tensor(offset, shape, dtype)
            if self._target.type == "cpu" and src.dtype == self.opts.dtype:
                dst = torch.empty(src.shape, dtype=src.dtype)
                host_copy(dst, src)
                encoder_cache[h] = dst
            else:
                encoder_cache[h] = src.to(device=self._target, dtype=self.opts.dtype, copy=True)
            self._loaded.append(load_id)
            self.counters.add("items_loaded")

    def build_connector_worker_meta(self):
        loaded, self._loaded = self._loaded, []
        return EmbresumeECWorkerMetadata(loaded=loaded, staged=frozenset(), started=frozenset())

    def close(self) -> None:
        self._close_views()

    def _close_views(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None
        for v in self._pool_views.values():
            v.close()
        self._pool_views.clear()


# ---------------------------------------------------------------- helpers
class FailureAlarm:
    """Says loudly that items are recomputed because their transfers fail.

    A consumer that still has its vision tower answers correctly without embresume, so a
    broken link (a producer down, starved threads, a wrong address) would otherwise show
    only as slower answers: one ERROR line per ``interval`` seconds while it lasts, with
    the count and the last reason (the ``recomputes`` and ``transfer_failures`` counters
    are what a dashboard alerts on)."""

    def __init__(self, interval: float = 30.0, clock=time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._since = 0
        self._last_reason = ""
        self._logged = -1e18

    def failed(self, reason: str) -> None:
        self._last_reason = str(reason)[:300]

    def recomputed(self, mm_hash: str) -> None:
        self._since += 1
        now = self._clock()
        if now - self._logged >= self.interval:
            log.error("embresume EC consumer: %d item(s) recomputed by this instance's own vision tower "
                      "since the last report because their transfers failed (last reason: %s); the "
                      "embeddings are not coming through embresume: check the producers and this "
                      "consumer's encoder_addresses (counters recomputes, transfer_failures)",
                      self._since, self._last_reason or "unknown")
            self._logged, self._since = now, 0


