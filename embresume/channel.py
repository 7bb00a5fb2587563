"""Control channels: how protocol messages travel between two endpoints.

A :class:`Channel` carries encoded :mod:`embresume.protocol` messages in both
directions between one language rank and one encoder.  ``send`` may be
called from any thread; incoming messages are delivered on the channel's own
reader thread to the ``on_message`` callback given to :meth:`Channel.start`.
Frames that fail to decode are reported to ``on_error`` and dropped: one bad
frame never stops the channel.

Implementations: the shm ring pair (:mod:`embresume.ipc.channel`, same host)
and ZeroMQ (this module, across hosts; also carries the handshake).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import Callable, Optional

import zmq

from . import protocol
from .errors import BindFailed, PeerError, ProtocolError
from .logutil import RateLimitedLog

log = logging.getLogger("embresume.channel")
plog = RateLimitedLog(log)

OnMessage = Callable[["Channel", protocol.Message], None]
OnError = Callable[["Channel", Exception], None]


class Channel(abc.ABC):
    kind: str = "?"
    #: the channel has a reader thread of its own (not shared with other peers),
    #: so work triggered by a message may run on it without delaying others
    dedicated: bool = False

    def __init__(self) -> None:
        self.on_message: Optional[OnMessage] = None
        self.on_error: Optional[OnError] = None
        self.on_closed: Optional[Callable[["Channel"], None]] = None

    def start(self, on_message: OnMessage, on_error: OnError, on_closed=None) -> None:
        self.on_message, self.on_error, self.on_closed = on_message, on_error, on_closed

    def deliver(self, data: bytes) -> None:
        try:
            msg = protocol.decode(data)
        except ProtocolError as e:
            if self.on_error:
                self.on_error(self, e)
            return
        if self.on_message:
            try:
                self.on_message(self, msg)
            except Exception as e:  # a handler bug must not kill the reader
                plog(logging.ERROR, "handler", "handler failed on %s", type(msg).__name__, exc_info=True)
                if self.on_error:
                    self.on_error(self, e)

    @abc.abstractmethod
    def send_bytes(self, data: bytes) -> None: ...

    def send(self, msg: protocol.Message) -> None:
        self.send_bytes(protocol.encode(msg))

    def stalled_for(self) -> float:
        """Seconds outbound frames have waited for the peer to make room (0:
        none wait).  The endpoints tear a link down past ``peer_timeout``."""
        return 0.0

    @abc.abstractmethod
    def close(self) -> None: ...


class RateBucket:
    """A token bucket: ``take()`` is True while the long-run rate stays within
    ``rate`` a second (``burst`` at once).  One thread per bucket (no lock)."""

    __slots__ = ("rate", "burst", "tokens", "t")

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = self.burst
        self.t = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


#: no-op frames (heartbeats, messages of a kind this side never expects) a peer
#: may send per second, and the burst; past it the link is torn down.  A peer
#: sends one heartbeat per heartbeat_interval: the bound is max(NOOP_RATE,
#: 20 / heartbeat_interval), the burst two seconds of it.
NOOP_RATE = 1000.0
NOOP_BURST_S = 2.0


def noop_bucket(heartbeat_interval: float) -> RateBucket:
    rate = max(NOOP_RATE, 20.0 / max(heartbeat_interval, 1e-3))
    return RateBucket(rate, rate * NOOP_BURST_S)


# --------------------------------------------------------------------- ZeroMQ
_ctx_lock = threading.Lock()
#: frames a socket queues from its peers before it stops reading them
RCV_HWM = 10000
#: frames a socket queues for one peer that does not read; past it the send
#: fails and on_send_error drops the peer (a refusal to a hello is dropped)
SND_HWM = 10000
ROUTER_SND_HWM = SND_HWM


def zmq_context() -> zmq.Context:
    with _ctx_lock:
        return zmq.Context.instance()


class ZmqHub:
    """One ROUTER (encoder) or DEALER (language) socket owned by one thread.

    Other threads send through an inproc PUSH socket guarded by a lock; the
    hub thread forwards.  Incoming frames go to ``on_frames(identity, data)``
    (identity is ``b""`` for a DEALER).
    """

    def __init__(self, sock_type: int, *, bind: Optional[str] = None, connect: Optional[str] = None,
                 on_frames: Callable[[bytes, bytes], None], name: str = "hub",
                 on_send_error: Optional[Callable[[bytes, Exception], None]] = None,
                 curve_keys=None, max_frame: int = 0):
        ctx = zmq_context()
        self.sock = ctx.socket(sock_type)
        self.sock.setsockopt(zmq.LINGER, 0)
        # control messages are small and must never be dropped silently: an
        # unroutable identity (ROUTER) and a full queue to one peer (SND_HWM:
        # that peer does not read) go to on_send_error, which drops the peer.
        # Receiving, a high-water mark only pushes back on a flooding peer
        # (ZeroMQ stops reading its connection), it drops nothing.
        self.sock.setsockopt(zmq.SNDHWM, SND_HWM)
        self.sock.setsockopt(zmq.RCVHWM, RCV_HWM)
        if max_frame:
            # a peer announcing a bigger frame is disconnected before it is buffered
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        if sock_type == zmq.ROUTER:
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._on_send_error = on_send_error
        self.sock_type = sock_type
        self._zap_domain = None
        if curve_keys is not None:
            from . import auth
            if bind:
                self._zap_domain = f"embresume-{id(self):x}"
                auth.make_server(self.sock, curve_keys, self._zap_domain)
            else:
                auth.make_client(self.sock, curve_keys)
        if bind:
            try:
                self.sock.bind(bind)
            except zmq.ZMQError as e:
                self.sock.close()
                raise BindFailed(f"cannot bind {bind}: {e}") from None
            self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.sock.connect(connect)
            self.address = connect
        self._inproc = f"inproc://embresume-{name}-{id(self):x}"
        self._pull = ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(self._inproc)
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.connect(self._inproc)
        self._push_lock = threading.Lock()
        self._on_frames = on_frames
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"embresume-{name}", daemon=True)
        self._thread.start()

    def send(self, identity: bytes, data: bytes) -> None:
        with self._push_lock:
            if self._stop:
                raise PeerError("ZeroMQ hub is closed")
            self._push.send_multipart([identity, data], copy=False)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # the sockets are this thread's: closed here, never under its feet by another
            # thread (which made the poll or a receive fail with ENOTSOCK); a thread that
            # ended on an error closes the hub too, so that no sender is mid-send on _push
            with self._push_lock:
                self._stop = True
            for s in (self._push, self._pull, self.sock):
                s.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        router = self.sock_type == zmq.ROUTER
        while not self._stop:
            try:
                events = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            if self._pull in events:
                while not self._stop:
                    try:
                        ident, data = self._pull.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        if router:
                            self.sock.send_multipart([ident, data], zmq.NOBLOCK)
                        else:
                            self.sock.send(data, zmq.NOBLOCK)
                    except zmq.ZMQError as e:  # unroutable peer (gone): tell the owner
                        plog(logging.WARNING, "unroutable", "cannot send a control frame: %s", e)
                        if self._on_send_error is not None:
                            try:
                                self._on_send_error(ident, e)
                            except Exception:
                                log.exception("send-error handler failed")
            if self.sock in events:
                while not self._stop:      # a handler may close the hub
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if router:
                        if len(frames) != 2:
                            plog(logging.WARNING, "frames", "ignoring ROUTER message with %d frames", len(frames))
                            continue
                        ident, data = frames
                    else:
                        if len(frames) != 1:
                            plog(logging.WARNING, "frames", "ignoring DEALER message with %d frames", len(frames))
                            continue
                        ident, data = b"", frames[0]
                    try:
                        self._on_frames(ident, data)
                    except Exception:
                        log.exception("ZeroMQ frame handler failed")

    def close(self) -> None:
        """Stops the hub's thread, which closes the sockets on its way out (within its
        100 ms poll); waits up to 2 s for that unless called from the hub's own thread
        (a frame handler), which closes them once the handler returns."""
        with self._push_lock:
            self._stop = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
            if self._thread.is_alive():
                log.warning("the ZeroMQ hub's thread %s did not stop within 2 s: its sockets close "
                            "when it does", self._thread.name)
        if self._zap_domain is not None:
            from . import auth
            auth.forget_server(self._zap_domain)


class ZmqChannel(Channel):
    """A channel to one peer over a :class:`ZmqHub` (cross-host control)."""

    kind = "zmq"

    def __init__(self, hub: ZmqHub, identity: bytes = b""):
        super().__init__()
        self.hub = hub
        self.identity = identity
        self.closed = False

    def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise PeerError("channel is closed")
        self.hub.send(self.identity, data)

    def close(self) -> None:
        self.closed = True
