"""The language rank's side of the handshake with an encoder.

:class:`Handshaker` connects to the encoder at an address and returns a live
:class:`Link` (control channel, liveness fields), or raises.  Same host: over
the encoder's abstract Unix socket, whose owner's uid the kernel tells us; the
pool and the control rings go as fds of sealed memfds.  Another host: over
ZeroMQ tcp with CURVE keys derived from the auth_key.  Both offer the
transports that can export the pool, in order, and offer the next one when the
encoder answers ``retry``.  The pool is exported once per transport instance
(:meth:`Handshaker.export`), whatever the number of encoders.

What it needs from the endpoint is passed in: the config, the pool and its
layout, this rank's identity (rank, TP group, ``new_session()`` for a new
session id per connection), the CURVE keys, the transports, the endpoint's
stop event.  What it gives back is the link, and for a tcp link the
``on_lost(link, reason)`` call when frames to the encoder pile up.  It touches
no room and takes no endpoint lock.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

import zmq

from .. import protocol as P
from ..channel import Channel, ZmqChannel, ZmqHub
from ..config import Config
from ..errors import ConfigError, PeerError, ProtocolError
from ..ipc import unix
from ..node import node_id
from ..transport import select

log = logging.getLogger("embresume.language")

#: the largest control frame accepted from an encoder
MAX_FRAME = 1 << 20


class Link:
    """One live connection to an encoder: control channel and liveness."""

    def __init__(self, channel: Channel, hub: Optional[ZmqHub], transport: str, peer_pid: int, pid_check: bool,
                 session_id: str, sock: Optional[socket.socket] = None):
        self.channel = channel
        #: same host: the handshake's Unix socket, kept open (EOF: the encoder is gone)
        self.sock = sock
        self.session_id = session_id
        self.hub = hub
        self.transport = transport
        self.peer_pid = peer_pid
        self.pid_check = pid_check
        self.last_seen = time.monotonic()
        self.busy = False
        self.alive = True
        self.hb_seq = 0
        self.noop = None        # the no-op frame bucket (set by the endpoint)

    def close(self) -> None:
        self.alive = False
        try:
            self.channel.close()
        finally:
            if self.hub is not None:
                self.hub.close()
            if self.sock is not None:
                self.sock.close()


class Retry(Exception):
    """The encoder cannot use the transport it chose: offer the others."""

    def __init__(self, transport: str, reason: str):
        super().__init__(reason)
        self.transport, self.reason = transport, reason


class Handshaker:
    """Connects one language rank to encoders (see the module docstring)."""

    def __init__(self, config: Config, *, pool, layout, tp_rank: int, tp_group: str, new_session: Callable[[], str],
                 keys, transports, stop: threading.Event):
        self.config = config
        self.pool = pool
        self.layout = layout
        self.tp_rank = tp_rank
        self.tp_group = tp_group
        self._new_session = new_session
        self._keys = keys
        self._transports = transports
        self._stop = stop
        self._lock = threading.Lock()
        self.exports: dict[int, dict] = {}          # id(transport instance) -> pool description

    def export(self, transport) -> dict:
        """The pool's description for ``transport`` (exported once per instance)."""
        with self._lock:
            desc = self.exports.get(id(transport))
            if desc is None:
                desc = self.exports[id(transport)] = transport.export_pool(self.pool)
            return desc

    def unexport_all(self) -> None:
        """(At close) Withdraw the pool from every transport instance that may have exported it."""
        for t in self._transports.instances():
            try:
                t.unexport_pool(self.pool)
            except Exception:
                log.debug("unexport failed", exc_info=True)

    def handshake(self, address: str, on_lost: Callable) -> Link:
        exclude: list[str] = []
        while True:
            try:
                return self._handshake_once(address, exclude, on_lost)
            except Retry as r:
                log.warning("transport %s unavailable towards %s (%s); trying the next one", r.transport,
                            address, r.reason)
                exclude.append(r.transport)

    def _probe(self, address: str) -> None:
        """Fail fast when nothing listens at a tcp address (ZeroMQ itself would
        queue the hello and wait out the whole handshake timeout)."""
        if not address.startswith("tcp://"):
            return
        u = urlsplit(address)
        try:
            socket.create_connection((u.hostname, u.port), timeout=min(1.0, self.config.handshake_timeout)).close()
        except OSError as e:
            raise PeerError(f"nothing accepts connections at {address}: {e.strerror or e}") from None

    def _handshake_once(self, address: str, exclude: list, on_lost: Callable) -> Link:
        if select.is_local(address):
            return self._handshake_unix(address, exclude)
        if self._keys is None:
            raise ConfigError(f"the encoder at {address} is on another host: its tcp handshake needs an "
                              "auth_key (Config(auth_key=...) / EMBRESUME_AUTH_KEY, the same on both sides)")
        return self._handshake_zmq(address, exclude, on_lost)

    def _offer(self, peer_host: str, exclude: list) -> list:
        offered = select.offer(self.config, self._transports, self.pool, peer_host, exclude)
        if not offered:
            raise ConfigError(f"no transport can export this endpoint's pool (transport={self.config.transport!r}"
                              + (f", excluded {exclude}" if exclude else "") + ")")
        return offered

    def _hello(self, offered: list) -> dict:
        return {"phase": "hello", "device": str(self.pool.device), "layout": self.layout.to_dict(),
                "offer": offered, "group": self.tp_group}

    def _handshake_unix(self, address: str, exclude: list) -> Link:
        """Same host: over the encoder's abstract Unix socket, whose owner's uid
        the kernel tells us; the pool and the rings go as fds of sealed memfds."""
        c = self.config
        name = unix.socket_name(address)
        try:
            sock = unix.connect(name, timeout=min(1.0, c.handshake_timeout))
        except OSError as e:
            raise PeerError(f"nothing accepts connections at {address} (no encoder listens on "
                            f"{unix.display(name)}: {e.strerror or e})") from None
        rings = None
        try:
            pid, uid, _ = unix.peer_cred(sock)
            if uid not in c.peer_uids:
                raise PeerError(f"the process at {unix.display(name)} (pid {pid}) runs as uid {uid}, which is not "
                                f"an allowed uid {sorted(c.peer_uids)} (Config.allowed_uids)")
            deadline = time.monotonic() + c.handshake_timeout
            session = self._new_session()
            offered = self._offer("127.0.0.1", exclude)
            unix.send(sock, P.encode(self._register(session, "", self._hello(offered))))
            reply = self._await_unix(sock, deadline, ("hello",), address)
            chosen = reply.transport
            if chosen not in offered:
                raise ProtocolError("transport", f"the encoder chose {chosen!r}, which was not offered")
            transport = self._transports.get(chosen, "127.0.0.1")
            from ..ipc.channel import RingChannel
            rings = RingChannel.create_pair(c.ring_bytes)
            desc = {"phase": "pool", "pool": self.export(transport),
                    "rings": {"l2e": [unix.Fd(x) for x in rings[0].handles()],
                              "e2l": [unix.Fd(x) for x in rings[1].handles()]}}
            desc, fds = unix.pack_fds(desc)
            unix.send(sock, P.encode(self._register(session, chosen, desc)), fds)
            ready = self._await_unix(sock, deadline, ("ready", "retry"), address)
            if ready.desc.get("phase") == "retry":
                raise Retry(chosen, str(ready.desc.get("reason", ""))[:1000])
            # the language side never spins (ring_spin_us is the encoder's): its
            # reader shares the GIL with the serving scheduler, which a spinner
            # would slow down (measured: -10-15 % throughput with 32-64 requests
            # in flight), and after a request's last message nothing is due
            channel = RingChannel(tx=rings[0], rx=rings[1], name=f"lang-r{self.tp_rank}")
            rings = None
            log.info("rank %d connected to %s (pid %d) via %s", self.tp_rank, address, pid, chosen)
            return Link(channel, None, chosen, pid, pid > 0, session, sock=sock)
        except (BrokenPipeError, ConnectionResetError) as e:
            if rings is not None:
                for r in rings:
                    r.close()
            sock.close()
            raise PeerError(f"the encoder at {address} closed the handshake ({e.strerror}); is this "
                            f"process's uid {os.getuid()} allowed there (its Config.allowed_uids)?") from None
        except BaseException:
            if rings is not None:
                for r in rings:
                    r.close()
            sock.close()
            raise

    def _await_unix(self, sock: socket.socket, deadline: float, phases: tuple, address: str) -> P.Register:
        try:
            data, fds = unix.recv_blocking(sock, deadline)
        except TimeoutError:
            raise PeerError(f"no handshake reply ({phases[0]}) from the encoder at {address} "
                            f"within {self.config.handshake_timeout}s") from None
        unix.close_all(fds)                 # an encoder sends none
        if not data:
            raise PeerError(f"the encoder at {address} closed the handshake; is this process's uid "
                            f"{os.getuid()} allowed there (its Config.allowed_uids)?")
        return self._check_reply(P.decode(data), phases)

    def _check_reply(self, msg: P.Message, phases: tuple) -> P.Register:
        if isinstance(msg, P.Bye):
            raise PeerError(f"encoder refused the handshake: {msg.reason}")
        if not isinstance(msg, P.Register) or msg.role != P.Role.ENCODER or msg.desc.get("phase") not in phases:
            raise ProtocolError("handshake", f"expected the encoder's {phases[0]!r} register, got {msg!r}")
        return msg

    def _handshake_zmq(self, address: str, exclude: list, on_lost: Callable) -> Link:
        """Another host: over ZeroMQ tcp with CURVE keys derived from the auth_key."""
        self._probe(address)
        inbox: "queue.Queue[bytes]" = queue.Queue(maxsize=64)
        relay: dict = {"channel": None}

        def on_frames(_ident: bytes, data: bytes) -> None:
            ch = relay["channel"]
            if ch is not None:
                ch.deliver(data)
            else:
                try:
                    inbox.put_nowait(data)
                except queue.Full:          # a chatty or hostile peer: the handshake fails on its own
                    pass

        session = self._new_session()

        def on_send_error(_ident: bytes, err: Exception) -> None:
            lost = relay.get("lost")
            if lost is not None:            # during the handshake the attempt times out on its own
                lost(err)

        hub: Optional[ZmqHub] = ZmqHub(zmq.DEALER, connect=address, on_frames=on_frames,
                                       name=f"lang-r{self.tp_rank}", curve_keys=self._keys, max_frame=MAX_FRAME,
                                       on_send_error=on_send_error)
        try:
            peer_host = select.endpoint_host(address)
            offered = self._offer(peer_host, exclude)
            hub.send(b"", P.encode(self._register(session, "", self._hello(offered))))
            reply = self._await(inbox, ("hello",), address)
            chosen = reply.transport
            if chosen not in offered:
                raise ProtocolError("transport", f"the encoder chose {chosen!r}, which was not offered")
            transport = self._transports.get(chosen, peer_host)
            hub.send(b"", P.encode(self._register(session, chosen, {"phase": "pool", "pool": self.export(transport)})))
            ready = self._await(inbox, ("ready", "retry"), address)
            if ready.desc.get("phase") == "retry":
                raise Retry(chosen, str(ready.desc.get("reason", ""))[:1000])
            channel = ZmqChannel(hub)
            link = Link(channel, hub, chosen, reply.pid, False, session)
            # the channel takes over the socket; until the caller starts it (before
            # any INIT goes out) only the encoder's heartbeats can arrive, and they
            # carry nothing to keep
            relay["channel"] = channel
            # frames to it pile up (it does not read): the link goes, like a full ring
            relay["lost"] = lambda err: on_lost(link, f"stuck: control frames to it queue up ({err}); "
                                                                   "it does not read")
            log.info("rank %d connected to %s via %s", self.tp_rank, address, chosen)
            return link
        except BaseException:
            hub.close()
            raise

    def _register(self, session: str, transport: str, desc: dict) -> P.Register:
        return P.Register(P.Role.LANGUAGE, session, node_id(), os.getpid(), self.tp_rank, transport, desc)

    def _await(self, inbox: "queue.Queue[bytes]", phases: tuple, address: str) -> P.Register:
        deadline = time.monotonic() + self.config.handshake_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or self._stop.is_set():
                    raise queue.Empty
                data = inbox.get(timeout=min(left, 0.25))
            except queue.Empty:
                if self._stop.is_set():
                    raise PeerError("endpoint closed during the handshake") from None
                if left > 0:
                    continue
                hint = (" (do both sides use the same auth_key?)" if self._keys is not None
                        else " (does the encoder require an auth_key?)")
                raise PeerError(f"no handshake reply ({phases[0]}) from the encoder at {address} "
                                f"within {self.config.handshake_timeout}s{hint}") from None
            msg = P.decode(data)
            if isinstance(msg, P.Heartbeat):
                continue
            return self._check_reply(msg, phases)

