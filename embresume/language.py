"""The language endpoint: receive pool, requests, resume and merge.

Lifecycle of one request (``room``) on a language rank::

    request(room)                      Bootstrapping   (waits here while the pool is empty)
      allocate default_allocate_tokens (or what the pool holds, >= 1 block)
      send INIT(allocated_tokens = len(blocks) * block_size)
                                       WaitingForInput
    STATUS Transferring (chunk k)      Transferring
      chunk 1: read total + mrope delta from aux of the first block, allocate the merged tensors
      gather the chunk into place, free its blocks, allocate the rest, send RESUME(sent_tokens, allocated_tokens)
    STATUS Success (last chunk)        Success   -> result(room) / recv(room)
    STATUS Failed / timeout / peer death           Failed    -> blocks freed, reason kept

The scheduler loop calls :meth:`LanguageEndpoint.poll` (non-blocking) and
:meth:`LanguageEndpoint.result`; :meth:`LanguageEndpoint.recv` is the blocking
convenience.  All network and copy work runs on threads the endpoint owns.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch
import zmq

from . import protocol as P
from .blocks import BlockAllocator, BlockLayout, BlockPool
from .channel import Channel, ZmqChannel, ZmqHub
from .config import Config
from .errors import AllocatorError, PeerError, ProtocolError, TransferFailed
from .merge import EmbeddingResult, MergeBuffer, ResultArena
from .node import node_id, pid_alive as _pid_alive, pidns as _pidns
from .status import Status, StatusTracker
from .transport.select import LOCAL, endpoint_host, make_transport

log = logging.getLogger("embresume.language")

#: sanity bound on a request's total tokens as read from aux (a corrupt or
#: hostile aux record must not make us allocate terabytes)
MAX_REQUEST_TOKENS = 1 << 24


@dataclass
class _Request:
    room: int
    required_dst_info_num: int
    deadline: float
    tracker: StatusTracker = field(default_factory=StatusTracker)
    blocks: list = field(default_factory=list)
    sent_tokens: int = 0
    total_tokens: int = 0
    chunks: int = 0
    merge: Optional[MergeBuffer] = None
    aux: Optional[torch.Tensor] = None
    result: Optional[EmbeddingResult] = None
    reason: str = ""
    waiting_alloc: bool = False
    copying: bool = False
    landed: int = 0        # tokens of the current chunk already copied (pipelined chunks)
    release: str = "free"
    event: threading.Event = field(default_factory=threading.Event)


class LanguageEndpoint:
    """One language (tensor-parallel) rank's side of the connection to an encoder.

    ``LanguageEndpoint(config, tp_rank=0)`` connects to ``config.encoder_endpoint``,
    agrees on a transport, creates and exports the receive pool, and starts
    the control channel.  Thread-safe; use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, config: Optional[Config] = None, *, tp_rank: int = 0, connect: bool = True):
        self.config = config or Config()
        self.tp_rank = tp_rank
        self.session_id = f"lang-{uuid.uuid4().hex[:12]}-r{tp_rank}"
        c = self.config
        self.layout = BlockLayout(c.total_pool_blocks, c.block_size, c.hidden_size, c.dtype, c.aux_ints)
        self.allocator = BlockAllocator(self.layout.num_blocks, self.layout.block_size)
        self.arena = ResultArena(c.result_cache_bytes, c.block_size)
        self.pool: Optional[BlockPool] = None
        self.transport = None
        self.transport_name = ""
        self.channel: Optional[Channel] = None
        self._hub: Optional[ZmqHub] = None
        self._lock = threading.RLock()
        self._reqs: dict[int, _Request] = {}
        self._waiting: collections.deque[int] = collections.deque()
        self._quarantine: dict[int, list[int]] = {}
        self._held: dict[int, list[int]] = {}
        self._peer_alive = False
        self._busy = False
        self._peer_reason = ""
        self._last_seen = time.monotonic()
        self._peer_pid = 0
        self._pid_check = False
        self._hb_seq = 0
        self._closed = False
        self._stop = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self.stats = collections.Counter()
        if connect:
            try:
                self.connect()
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------ handshake
    def connect(self) -> None:
        c = self.config
        pref = c.transport
        for attempt in range(2):
            try:
                self._handshake(pref)
                break
            except _Fallback as fb:
                log.warning("transport %s unavailable (%s); falling back to %s", fb.failed, fb.reason, fb.to)
                pref = fb.to
        self._peer_alive = True
        self._last_seen = time.monotonic()
        self.channel.start(self._on_message, self._on_channel_error, self._on_channel_closed)
        self._monitor = threading.Thread(target=self._monitor_loop, name="embresume-lang-monitor", daemon=True)
        self._monitor.start()

    def _handshake(self, pref: str) -> None:
        c = self.config
        inbox: "queue.Queue[bytes]" = queue.Queue()
        relay = {"channel": None}

        def on_frames(_ident: bytes, data: bytes) -> None:
            ch = relay["channel"]
            if ch is not None:
                ch.deliver(data)
            else:
                inbox.put(data)

        hub = ZmqHub(zmq.DEALER, connect=c.encoder_endpoint, on_frames=on_frames,
                     name=f"lang-r{self.tp_rank}")
        rings = None
        try:
            hello = {"phase": "hello", "device": c.device, "layout": self.layout.to_dict(),
                     "pidns": _pidns()}
            hub.send(b"", P.encode(self._register(pref, hello)))
            reply = self._await(inbox, "hello")
            chosen = reply.transport
            self._peer_pid = reply.pid
            self._pid_check = reply.node_id == node_id() and reply.desc.get("pidns") == _pidns()
            transport = make_transport(chosen, c, peer_host=endpoint_host(c.encoder_endpoint))
            # the shm path keeps the pool on the host even for a GPU model (the
            # fallback when CUDA IPC is unavailable); results move to c.device
            pool_device = "cpu" if chosen == "shm" else c.device
            backing = transport.create_backing(self.layout.nbytes, pool_device, c.prefault)
            pool = BlockPool(self.layout, backing)
            try:
                desc = {"phase": "pool", "pool": transport.export_pool(pool)}
            except Exception as e:
                pool.close()
                if chosen == "cuda_ipc":
                    raise _Fallback("cuda_ipc", str(e), "shm") from None
                raise
            if chosen in LOCAL:
                from .ipc.channel import RingChannel
                rings = RingChannel.create_pair(c.ring_bytes)
                desc["rings"] = {"l2e": rings[0].name, "e2l": rings[1].name}
            self.pool, self.transport, self.transport_name = pool, transport, chosen
            hub.send(b"", P.encode(self._register(chosen, desc)))
            try:
                self._await(inbox, "ready")
            except PeerError as e:
                if chosen == "cuda_ipc" and "cuda_ipc unavailable" in str(e):
                    self._drop_pool(rings)
                    rings = None
                    raise _Fallback("cuda_ipc", str(e), "shm") from None
                raise
            if chosen in LOCAL:
                # both sides attached: the names can go, the mappings stay
                from .ipc.channel import RingChannel
                self.channel = RingChannel(tx=rings[0], rx=rings[1], name=f"lang-r{self.tp_rank}")
                self.channel.unlink()
                transport.unexport_pool(pool)
                hub.close()
            else:
                self._hub = hub
                self.channel = ZmqChannel(hub)
                relay["channel"] = self.channel
                while not inbox.empty():
                    self.channel.deliver(inbox.get_nowait())
            log.info("rank %d connected to %s via %s", self.tp_rank, c.encoder_endpoint, chosen)
        except BaseException:
            if self.channel is None:
                hub.close()
                self._drop_pool(rings)
            raise

    def _drop_pool(self, rings) -> None:
        if rings:
            for r in rings:
                r.close()
        if self.pool is not None:
            if self.transport is not None:
                try:
                    self.transport.unexport_pool(self.pool)
                except Exception:
                    pass
            self.pool.close()
            self.pool = None

    def _register(self, transport: str, desc: dict) -> P.Register:
        return P.Register(P.Role.LANGUAGE, self.session_id, node_id(), os.getpid(), self.tp_rank, transport, desc)

    def _await(self, inbox: "queue.Queue[bytes]", phase: str) -> P.Register:
        try:
            data = inbox.get(timeout=self.config.handshake_timeout)
        except queue.Empty:
            raise PeerError(f"no handshake reply ({phase}) from encoder at {self.config.encoder_endpoint} "
                            f"within {self.config.handshake_timeout}s") from None
        msg = P.decode(data)
        if isinstance(msg, P.Bye):
            raise PeerError(f"encoder refused the handshake: {msg.reason}")
        if not isinstance(msg, P.Register) or msg.role != P.Role.ENCODER or msg.desc.get("phase") != phase:
            raise ProtocolError("handshake", f"expected the encoder's {phase!r} register, got {msg!r}")
        return msg

    # ------------------------------------------------------------ requests
    def request(self, room: int, required_dst_info_num: int = 1) -> Status:
        """Start receiving ``room``: allocate and send INIT (or queue for blocks)."""
        if not isinstance(room, int) or room < 0:
            raise ValueError(f"room must be a non-negative int, got {room!r}")
        with self._lock:
            if self._closed:
                raise PeerError("endpoint is closed")
            old = self._reqs.get(room)
            if old is not None and not old.tracker.status.terminal:
                raise ValueError(f"room {room} is already in flight")
            if old is not None and old.tracker.status is Status.Success:
                raise ValueError(f"room {room} has a result nobody collected: call result({room}) first")
            if old is not None and old.copying:
                raise ValueError(f"room {room} is still being released after a failure")
            if room in self._quarantine or room in self._held:
                raise ValueError(f"room {room} still waits for the encoder to confirm an abort")
            req = _Request(room, required_dst_info_num, time.monotonic() + self.config.request_timeout)
            self._reqs[room] = req
            if not self._peer_alive:
                self._fail(req, f"encoder is unreachable: {self._peer_reason or 'not connected'}", notify=False)
                return req.tracker.status
            if self._waiting or not self._try_allocate(req, self.config.default_allocate_tokens):
                req.waiting_alloc = True
                self._waiting.append(room)
            return req.tracker.status

    def _try_allocate(self, req: _Request, tokens: int) -> bool:
        """Allocate up to ``tokens`` tokens (>= 1 block) and send INIT/RESUME."""
        if self.config.max_chunk_tokens:
            tokens = min(tokens, self.config.max_chunk_tokens)
        blocks = self.allocator.allocate(tokens, req.room, min_tokens=1)
        if not blocks:
            return False
        req.blocks = blocks
        allocated = self.allocator.allocated_tokens(blocks)  # rule 2: what was really allocated
        endpoint = self.config.encoder_endpoint
        fields = dict(room=req.room, endpoint=endpoint, dst_port=self.tp_rank, session_id=self.session_id,
                      dst_blocks=tuple(blocks), required_dst_info_num=req.required_dst_info_num,
                      allocated_tokens=allocated)
        msg = P.Init(**fields) if req.chunks == 0 else P.Resume(**fields, sent_tokens=req.sent_tokens)
        try:
            self.channel.send(msg)
        except PeerError as e:
            self._fail(req, f"cannot reach the encoder: {e}", notify=False)
            return True
        if req.chunks == 0:
            req.tracker.set(Status.WaitingForInput)
        else:
            self.stats["resumes"] += 1
        return True

    def _drain_waiting(self) -> None:
        """Serve queued allocations in FIFO order (resumes and inits alike)."""
        while self._waiting:
            room = self._waiting[0]
            req = self._reqs.get(room)
            if req is None or req.tracker.status.terminal or not req.waiting_alloc:
                self._waiting.popleft()
                continue
            want = (self.config.default_allocate_tokens if req.chunks == 0
                    else req.total_tokens - req.sent_tokens)
            if not self._try_allocate(req, want):
                return
            req.waiting_alloc = False
            self._waiting.popleft()

    def poll(self, room: int) -> Status:
        """Non-blocking: never waits for the endpoint's lock or a copy."""
        req = self._reqs.get(room)
        if req is None:
            raise KeyError(f"unknown room {room}")
        return req.tracker.status

    def result(self, room: int) -> EmbeddingResult:
        """Pop the merged result of a room that reached Success."""
        with self._lock:
            req = self._reqs.get(room)
            if req is None:
                raise KeyError(f"unknown room {room}")
            if req.tracker.status is Status.Failed:
                del self._reqs[room]
                raise TransferFailed(room, req.reason)
            if req.tracker.status is not Status.Success:
                raise RuntimeError(f"room {room} is {req.tracker.status.name}, not Success")
            del self._reqs[room]
            return req.result

    def failure_reason(self, room: int) -> str:
        with self._lock:
            req = self._reqs.get(room)
            return req.reason if req else ""

    def history(self, room: int) -> list[Status]:
        with self._lock:
            return list(self._reqs[room].tracker.history)

    def wait(self, room: int, timeout: Optional[float] = None) -> Status:
        with self._lock:
            req = self._reqs.get(room)
        if req is None:
            raise KeyError(f"unknown room {room}")
        req.event.wait(timeout)
        return req.tracker.status

    def recv(self, room: int, timeout: Optional[float] = None, required_dst_info_num: int = 1) -> EmbeddingResult:
        """Blocking convenience: request ``room`` (unless already requested),
        wait for a terminal status, return the merged result."""
        with self._lock:
            req = self._reqs.get(room)
            if req is not None and req.tracker.status is Status.Success:
                return self.result(room)        # it arrived before we were asked
        if req is None or req.tracker.status is Status.Failed:
            self.request(room, required_dst_info_num)
        timeout = self.config.request_timeout if timeout is None else timeout
        st = self.wait(room, timeout)
        if not st.terminal:
            self.abort(room, f"no result within {timeout}s")
        return self.result(room)

    def abort(self, room: int, reason: str = "aborted by the language side") -> None:
        with self._lock:
            req = self._reqs.get(room)
            if req is None or req.tracker.status.terminal:
                return
            self._fail(req, reason, notify=True)

    # ------------------------------------------------------------ failure
    def _fail(self, req: _Request, reason: str, *, notify: bool, peer_dead: bool = False,
              hold: bool = False) -> None:
        """Mark Failed and release blocks.  When the encoder may still write
        into the blocks (it was told to abort, not dead), they stay
        quarantined until it confirms; a dead peer or torn-down connection
        releases them at once."""
        if not req.tracker.fail():
            return
        req.reason = reason
        req.waiting_alloc = False
        self.stats["failed"] += 1
        log.warning("room %d failed: %s", req.room, reason)
        if req.merge is not None and not req.copying:
            req.merge.discard()
            req.merge = None
        alive = self._peer_alive and not peer_dead
        mode = "hold" if hold and alive else "quarantine" if notify and alive else "free"
        if req.copying:
            # the reader thread is copying out of these blocks: it releases them
            req.release = mode
        elif req.blocks or mode == "quarantine":
            # an ABORT goes out: the room stays quarantined (even without blocks)
            # until the encoder's acknowledgement, so a retry never meets it
            self._park(req.room, req.blocks, mode)
            req.blocks = []
        if notify and self._peer_alive and not peer_dead:
            try:
                self.channel.send(P.Abort(req.room, reason[:1000]))
            except PeerError:
                self._release_quarantine(req.room)
        req.event.set()
        self._drain_waiting()

    def _release_held(self) -> None:
        """The connection is torn down: nothing can land in held blocks any more."""
        for room, blocks in list(self._held.items()):
            self.allocator.free(blocks, room)
        self._held.clear()

    def _release_quarantine(self, room: int) -> None:
        blocks = self._quarantine.pop(room, None)
        if blocks:
            self.allocator.free(blocks, room)

    # ------------------------------------------------------------ messages
    def _on_message(self, _ch: Channel, msg: P.Message) -> None:
        self._last_seen = time.monotonic()
        if isinstance(msg, P.Heartbeat):
            return
        if isinstance(msg, (P.StatusMsg, P.Progress)):
            with self._lock:
                job = self._on_status(msg) if isinstance(msg, P.StatusMsg) else self._on_progress(msg)
            if job is not None:
                self._busy = True  # the monitor does not count silence while we copy
                try:
                    self._copy(*job)  # outside the lock: poll() never waits for it
                finally:
                    self._busy = False
                    self._last_seen = time.monotonic()
            return
        if isinstance(msg, P.Bye):
            self._peer_lost(f"encoder closed the connection: {msg.reason}")
            return
        log.warning("ignoring unexpected %s from the encoder", type(msg).__name__)

    def _live_request(self, room: int) -> Optional[_Request]:
        req = self._reqs.get(room)
        if req is None or req.tracker.status.terminal:
            return None
        return req

    def _on_status(self, msg: P.StatusMsg):
        room = msg.room
        if room in self._quarantine:
            # the encoder's answer to our abort (or its own failure of the
            # aborted attempt): nothing more will be written into those blocks
            if msg.status is Status.Failed:
                self._release_quarantine(room)
                self._drain_waiting()
            return None
        if msg.flags & P.FLAG_ABORT_ACK:
            return None  # a late acknowledgement: it never fails a newer request for the room
        req = self._live_request(room)
        if req is None:
            log.debug("late status %s for room %d ignored", msg.status.name, room)
            return None
        if msg.status is Status.Failed:
            if msg.flags & P.FLAG_BLOCKS_UNSAFE:
                # a write into these blocks may still land: quarantined until teardown
                self.stats["unsafe_blocks"] += len(req.blocks)
                self._fail(req, f"encoder: {msg.reason or 'failed'}", notify=False, hold=True)
            else:
                self._fail(req, f"encoder: {msg.reason or 'failed'}", notify=False)
            return None
        if msg.status not in (Status.Transferring, Status.Success) or not req.blocks or req.waiting_alloc:
            self._fail(req, f"unexpected status {msg.status.name} in state {req.tracker.status.name}", notify=True)
            return None
        try:
            return self._check_chunk(req, msg)
        except (ValueError, ProtocolError, AllocatorError) as e:
            self._fail(req, f"bad chunk: {e}", notify=True)
        return None

    def _on_progress(self, msg: P.Progress):
        """Part of the current chunk landed: copy it out while the rest is written."""
        req = self._live_request(msg.room)
        if req is None or msg.room in self._quarantine:
            return None
        try:
            if not req.blocks or req.waiting_alloc or msg.seq != req.chunks + 1:
                raise ProtocolError("seq", f"progress for chunk {msg.seq} while expecting {req.chunks + 1}")
            bs = self.layout.block_size
            self._ensure_total(req, 0)
            tokens = min(req.total_tokens - req.sent_tokens, self.allocator.allocated_tokens(req.blocks))
            if msg.landed % bs or not req.landed < msg.landed < tokens:
                raise ProtocolError("landed", f"{msg.landed} tokens landed: must be whole blocks within "
                                              f"({req.landed}, {tokens})")
        except (ValueError, ProtocolError) as e:
            self._fail(req, f"bad progress report: {e}", notify=True)
            return None
        if self._zero_copy_candidate(req, tokens):
            return None  # the whole request arrives in this chunk: it will not be copied at all
        req.copying = True
        return req, req.blocks[req.landed // bs:msg.landed // bs], msg.landed - req.landed, None

    def _ensure_total(self, req: _Request, status_total: int) -> None:
        """On the first data of a request: read aux (rule 3: only the first
        block of the first chunk carries it) and keep it for the whole request."""
        if req.aux is not None:
            return
        aux = self.pool.aux[req.blocks[0]].clone().cpu()
        total = int(aux[0])
        if not 0 < total <= MAX_REQUEST_TOKENS:
            raise ProtocolError("aux", f"total token count {total} is outside [1, {MAX_REQUEST_TOKENS}]")
        if status_total and status_total != total:
            raise ProtocolError("total_tokens", f"status says {status_total}, aux says {total}")
        req.total_tokens = total
        req.aux = aux

    def _zero_copy_candidate(self, req: _Request, tokens: int) -> bool:
        """The request completes in its first chunk, in consecutive blocks."""
        if not self.config.zero_copy or req.chunks or req.landed or tokens != req.total_tokens:
            return False
        if self.pool.device.type != torch.device(self.config.device).type:
            return False  # host-path fallback for a GPU model: results are moved, not viewed
        need = -(-tokens // self.layout.block_size)
        b0 = req.blocks[0]
        return req.blocks[:need] == list(range(b0, b0 + need))

    def _zero_copy(self, req: _Request, tokens: int) -> bool:
        """Single-chunk request in consecutive blocks: hand out views of the pool
        (no gather copy); the blocks stay with the result until it is released."""
        if not self._zero_copy_candidate(req, tokens):
            return False
        bs = self.layout.block_size
        need = -(-tokens // bs)
        b0 = req.blocks[0]
        pool, H = self.pool, self.layout.hidden
        emb = pool.embeddings[b0:b0 + need].reshape(need * bs, H)[:tokens]
        fill = pool.fill_ids[b0:b0 + need].reshape(need * bs)[:tokens]
        # mrope is [3, bs] per block: [3, T] needs this small copy (12 bytes a token)
        mrope = pool.mrope[b0:b0 + need].transpose(0, 1).reshape(3, need * bs)[:, :tokens].contiguous()
        spare = req.blocks[need:]
        if spare:
            self.allocator.free(spare, req.room)
        blocks, req.blocks = req.blocks[:need], []
        req.chunks = 1
        req.sent_tokens = tokens
        self.stats["chunks"] += 1
        self.stats["zero_copy"] += 1
        self.stats["bytes"] += tokens * self.layout.emb_row_bytes
        res = EmbeddingResult(req.room, emb, fill, mrope, req.aux, 1, req.tracker.history + [Status.Success],
                              _PoolLease(self, req.room, blocks))
        req.result = res
        req.tracker.set(Status.Success)
        self.stats["success"] += 1
        req.event.set()
        self._drain_waiting()
        return True

    def _release_pool_lease(self, room: int, blocks: list) -> None:
        with self._lock:
            self.allocator.free(blocks, room)
            self._drain_waiting()

    def _check_chunk(self, req: _Request, msg: P.StatusMsg):
        """Validate a chunk's STATUS (under the lock); returns the copy job."""
        if msg.seq != req.chunks + 1:
            raise ProtocolError("seq", f"expected chunk {req.chunks + 1}, got {msg.seq}")
        self._ensure_total(req, msg.total_tokens)
        if msg.total_tokens and msg.total_tokens != req.total_tokens:
            raise ProtocolError("total_tokens", f"status says {msg.total_tokens}, aux said {req.total_tokens}")
        allocated = self.allocator.allocated_tokens(req.blocks)
        remaining = req.total_tokens - req.sent_tokens
        tokens = min(remaining, allocated)
        complete = tokens == remaining
        if msg.chunk_tokens != tokens:
            raise ProtocolError("chunk_tokens", f"expected {tokens}, got {msg.chunk_tokens}")
        if (msg.status is Status.Success) != complete:
            raise ProtocolError("status", f"{msg.status.name} with {remaining - tokens} tokens left")
        if msg.sent_tokens != req.sent_tokens + tokens:
            raise ProtocolError("sent_tokens", f"expected {req.sent_tokens + tokens}, got {msg.sent_tokens}")
        if complete and self._zero_copy(req, tokens):
            return None
        req.copying = True
        bs = self.layout.block_size
        return req, req.blocks[req.landed // bs:], tokens - req.landed, (tokens, complete)

    def _copy(self, req: _Request, blocks: list, tokens: int, end) -> None:
        """Copy ``tokens`` tokens out of ``blocks`` into the merge buffer; ``end``
        is ``(chunk_tokens, complete)`` for a chunk's final status, None for progress."""
        err = None
        try:
            if req.merge is None:
                req.merge = MergeBuffer(req.total_tokens, self.layout.hidden, self.layout.dtype, self.pool.device,
                                        req.aux, self.arena)
            if tokens:
                req.merge.add(self.pool, blocks, tokens)
            if self.pool.device.type == "cuda":
                # gather kernels are asynchronous: the blocks are freed (and may be
                # written by the encoder for another request) only after they finished
                torch.cuda.current_stream(self.pool.device).synchronize()
        except Exception as e:  # pragma: no cover - a copy failing is a bug or a dead device
            err = e
        with self._lock:
            req.copying = False
            if req.tracker.status.terminal:
                # failed (abort, timeout, peer loss) while we copied: release now
                self._release_after_copy(req)
                return
            if err is not None:
                self._fail(req, f"copying the chunk failed: {err}", notify=True)
                return
            req.landed += tokens
            if end is not None:
                req.landed = 0
                self._chunk_done(req, *end)

    def _release_after_copy(self, req: _Request) -> None:
        if req.merge is not None:
            req.merge.discard()
            req.merge = None
        blocks, req.blocks = req.blocks, []
        mode = req.release if self._peer_alive else "free"
        if blocks or mode == "quarantine":
            self._park(req.room, blocks, mode)
            self._drain_waiting()

    def _park(self, room: int, blocks: list, mode: str) -> None:
        """Release a failed room's blocks: ``free`` now; ``quarantine`` until the
        encoder confirms our abort; ``hold`` until the connection is torn down
        (a failed write into them may still land)."""
        if mode == "free":
            if blocks:
                self.allocator.free(blocks, room)
        elif mode == "quarantine":
            self._quarantine.setdefault(room, []).extend(blocks)
        else:
            self._held.setdefault(room, []).extend(blocks)

    def _chunk_done(self, req: _Request, tokens: int, complete: bool) -> None:
        pool = self.pool
        self.allocator.free(req.blocks, req.room)
        req.blocks = []
        req.sent_tokens += tokens
        req.chunks += 1
        req.deadline = time.monotonic() + self.config.request_timeout
        self.stats["chunks"] += 1
        self.stats["bytes"] += tokens * self.layout.emb_row_bytes
        if complete:
            res = req.merge.result(req.room, req.tracker.history + [Status.Success], req.chunks)
            if pool.device.type != "cuda" and self.config.device.startswith("cuda"):
                res.embeddings, res.fill_ids, res.mrope_positions = (
                    t.to(self.config.device) for t in (res.embeddings, res.fill_ids, res.mrope_positions))
            req.result = res
            req.merge = None
            req.tracker.set(Status.Success)
            self.stats["success"] += 1
            req.event.set()
            self._drain_waiting()
            return
        req.tracker.set(Status.Transferring)
        # free first, then allocate the rest: a resume can always reuse its own
        # blocks, and it never queues behind new requests (with TP ranks that
        # would let two ranks wait on each other through the encoder's gate)
        if not self._try_allocate(req, req.total_tokens - req.sent_tokens):
            req.waiting_alloc = True
            self._waiting.append(req.room)
            self._drain_waiting()

    # ------------------------------------------------------------ liveness
    def _on_channel_error(self, _ch: Channel, err: Exception) -> None:
        self.stats["bad_messages"] += 1
        log.warning("bad control message from the encoder: %s", err)

    def _on_channel_closed(self, _ch: Channel) -> None:
        self._peer_lost("control channel closed by the encoder")

    def _peer_lost(self, reason: str) -> None:
        with self._lock:
            if not self._peer_alive:
                return
            self._peer_alive = False
            self._peer_reason = reason
            log.error("encoder lost: %s", reason)
            for room in list(self._quarantine):
                self._release_quarantine(room)
            self._release_held()
            for req in list(self._reqs.values()):
                if not req.tracker.status.terminal:
                    self._fail(req, f"encoder lost: {reason}", notify=False, peer_dead=True)
            self._waiting.clear()

    @property
    def connected(self) -> bool:
        return self._peer_alive

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval):
            try:
                self._monitor_once()
            except Exception:  # the monitor must outlive any one bad iteration
                log.exception("language monitor iteration failed")

    def _monitor_once(self) -> None:
        c = self.config
        if self._peer_alive:
            self._hb_seq += 1
            try:
                self.channel.send(P.Heartbeat(self._hb_seq, time.time_ns()))
            except PeerError as e:
                self._peer_lost(str(e))
            silent = time.monotonic() - self._last_seen
            if silent > c.peer_timeout and not self._busy:
                self._peer_lost(f"no message for {silent:.1f}s (peer_timeout {c.peer_timeout}s)")
            elif self._pid_check and self._peer_pid and not _pid_alive(self._peer_pid):
                self._peer_lost(f"encoder process {self._peer_pid} exited")
        now = time.monotonic()
        with self._lock:
            for req in list(self._reqs.values()):
                if not req.tracker.status.terminal and now > req.deadline:
                    self._fail(req, f"timed out in {req.tracker.status.name} "
                                    f"after {c.request_timeout}s without progress", notify=True)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self.channel is not None and self._peer_alive:
            try:
                self.channel.send(P.Bye("language endpoint closed"))
            except PeerError:
                pass
        with self._lock:
            self._peer_alive = False
            self._peer_reason = "endpoint closed"
            for req in list(self._reqs.values()):
                if not req.tracker.status.terminal:
                    self._fail(req, "endpoint closed", notify=False, peer_dead=True)
            for room in list(self._quarantine):
                self._release_quarantine(room)
            self._release_held()
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        if self.channel is not None:
            self.channel.close()
        if self._hub is not None:
            self._hub.close()
        if self.pool is not None:
            if self.transport is not None:
                try:
                    self.transport.unexport_pool(self.pool)
                except Exception:
                    log.debug("unexport failed", exc_info=True)
                self.transport.close()
            self.pool.close()

    def __enter__(self) -> "LanguageEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PoolLease:
    """Blocks of the receive pool lent to a zero-copy result until it is released."""

    __slots__ = ("endpoint", "room", "blocks")

    def __init__(self, endpoint: "LanguageEndpoint", room: int, blocks: list):
        self.endpoint, self.room, self.blocks = endpoint, room, blocks

    def give_back(self) -> None:
        self.endpoint._release_pool_lease(self.room, self.blocks)


class _Fallback(Exception):
    def __init__(self, failed: str, reason: str, to: str):
        super().__init__(reason)
        self.failed, self.reason, self.to = failed, reason, to
