"""The encoder's side of the handshake with language ranks.

:class:`Handshakes` answers the handshake messages of peers that are not
registered yet, over the ZeroMQ (tcp) socket (peers elsewhere, with an
auth_key only) and over the abstract Unix socket (peers on this host, whose
uid the kernel vouched for): ``hello`` (layout checked, a transport chosen from
the offer, the session bound checked) is answered ``hello``; the ``pool``
description is opened by the chosen transport and answered ``ready`` (through
the endpoint, which makes the peer visible) or ``retry`` (this pair of
processes cannot use that transport).  A failed handshake is answered with a
Bye (to tcp peers within the refusal rate) and counted.

Its narrow interface to the endpoint: the config, the counters, the CURVE
keys, the transports, the ZeroMQ hub (``hub``, set once bound), and three
calls: ``check_sessions()`` (raise PeerError when no session can be added),
``admit(hs, msg, transport_name, transport, pool, channel, pid, group)`` (make
the peer and reply ``ready`` under the endpoint lock; raise when it cannot)
and ``peer_lost(peer, reason, clean=False)`` (a registered peer's handshake
socket spoke or closed).  It touches no room and takes no endpoint lock.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from .. import protocol as P
from ..blocks import BlockLayout
from ..channel import Channel, RateBucket, ZmqChannel
from ..config import Config
from ..errors import ConfigError, PeerError, ProtocolError, TransportUnavailable
from ..ipc import unix
from ..logutil import RateLimitedLog, clip
from ..node import node_id
from ..transport import select

log = logging.getLogger("embresume.encoder")
#: what peers cause (bad frames, refusals): a bounded number of lines
plog = RateLimitedLog(log)

#: hellos whose pool description has not come yet
MAX_PENDING_HANDSHAKES = 256
#: refusals (a Bye) to tcp peers that are not registered (a keyless hello, an
#: undecodable frame): at most REFUSAL_RATE a second after a burst of
#: REFUSAL_BURST, for the whole endpoint; the rest are dropped and counted
REFUSAL_RATE = 100.0
REFUSAL_BURST = 200.0
#: the longest TP group identity a rank may present
MAX_GROUP = 256


def reply(transport: str, desc: dict) -> P.Register:
    """The encoder's handshake message (hello / retry / ready)."""
    return P.Register(P.Role.ENCODER, "encoder", node_id(), os.getpid(), 0, transport, desc)


class HsZmq:
    """A handshake that came over the ZeroMQ (tcp) socket: a peer elsewhere."""

    same_host = False
    conn = None
    pid = 0

    def __init__(self, hub, ident: bytes):
        self.key = ident
        self._hub = hub

    def reply(self, msg: P.Message) -> None:
        self._hub.send(self.key, P.encode(msg))


class HsUnix:
    """A handshake that came over the Unix socket: a peer on this host whose
    uid the kernel vouched for."""

    same_host = True

    def __init__(self, conn: unix.Conn):
        self.key = self.conn = conn
        self.pid = conn.pid

    def reply(self, msg: P.Message) -> None:
        self.conn.send(P.encode(msg))


class Handshakes:
    """The encoder's handshakes (see the module docstring)."""

    def __init__(self, config: Config, *, stats, keys, transports, check_sessions: Callable, admit: Callable,
                 peer_lost: Callable):
        self.config = config
        self.stats = stats
        self._keys = keys
        self._transports = transports
        self._check_sessions = check_sessions
        self._admit = admit
        self._peer_lost = peer_lost
        self.hub = None                                     # the endpoint's ZmqHub, once bound
        self.pending: dict = {}                             # hellos waiting for their pool description
        self.refusals = RateBucket(REFUSAL_RATE, REFUSAL_BURST)

    def listen_unix(self, name: str) -> unix.Server:
        """Listen on the same-host handshake socket ``name`` (its packets come
        here); ConfigError when it cannot (the name is taken)."""
        c = self.config
        try:
            return unix.Server(name, allowed_uids=c.peer_uids, on_packet=self.on_unix_packet,
                               on_closed=self.on_unix_closed, on_bad=self.on_unix_bad, on_refused=self.on_unix_refused,
                               max_pending=MAX_PENDING_HANDSHAKES, pending_timeout=c.handshake_timeout,
                               thread_name="embresume-enc-unix")
        except OSError as e:
            raise ConfigError(f"cannot listen on the same-host handshake socket {unix.display(name)} "
                              f"({e.strerror or e}): another encoder of this host (or a squatter) holds it; "
                              f"use another port") from None

    def expire(self, now: float) -> None:
        """Forget the hellos never followed by a pool description in time."""
        for key, hs in list(self.pending.items()):
            if now - hs["t"] > self.config.handshake_timeout:
                self.pending.pop(key, None)

    def on_frame(self, ident: bytes, data: bytes) -> None:
        """A frame from a tcp peer that is not registered (yet)."""
        try:
            msg = P.decode(data)
        except ProtocolError as e:
            self.warn_bad(f"bad handshake frame: {e}")
            self.refuse(ident, f"bad handshake frame: {e}")
            return
        if not isinstance(msg, P.Register) or msg.role != P.Role.LANGUAGE:
            log.debug("ignoring %s from an unregistered peer", type(msg).__name__)
            return
        if self._keys is None:
            # without a key a tcp peer is anyone who reaches the port; peers on
            # this host use the Unix socket, where the kernel vouches for them
            self.warn_bad("tcp handshake refused: this encoder has no auth_key")
            self.refuse(ident, "tcp handshakes need an auth_key (Config(auth_key=...) / EMBRESUME_AUTH_KEY on "
                               "both sides); peers on the encoder's host connect over its Unix socket")
            return
        self._step(HsZmq(self.hub, ident), msg, [])

    def refuse(self, ident: bytes, reason: str) -> None:
        """A Bye to an unregistered tcp peer, within the refusal rate (REFUSAL_RATE)."""
        if self.refusals.take():
            self.stats["refusals_sent"] += 1
            try:
                self.hub.send(ident, P.encode(P.Bye(clip(reason, 1000))))
            except PeerError:
                pass
        else:
            self.stats["refusals_dropped"] += 1

    def on_unix_packet(self, conn: unix.Conn, data: bytes, fds: list) -> None:
        try:
            if conn.established:
                # after 'ready' the socket only marks liveness: a packet is a broken peer
                peer = conn.owner
                conn.close()
                if peer is not None:
                    self._peer_lost(peer, "unexpected packet on its handshake socket")
                return
            try:
                msg = P.decode(data)
            except ProtocolError as e:
                self.warn_bad(f"bad handshake packet from {conn!r}: {e}")
                self._bye(HsUnix(conn), f"bad handshake packet: {e}")
                conn.close()
                return
            if not isinstance(msg, P.Register) or msg.role != P.Role.LANGUAGE:
                self.warn_bad(f"unexpected {type(msg).__name__} from {conn!r} during the handshake")
                conn.close()
                return
            if not self._step(HsUnix(conn), msg, fds):
                conn.close()
        finally:
            unix.close_all(fds)             # what we keep, we duplicated (mmap, the rings' doorbells)

    def on_unix_closed(self, conn: unix.Conn) -> None:
        self.pending.pop(conn, None)
        peer = conn.owner
        if peer is not None:
            self._peer_lost(peer, "its handshake socket closed (the process exited or closed the endpoint)",
                            clean=True)

    def on_unix_bad(self, conn: unix.Conn, err: Exception) -> None:
        self.warn_bad(f"bad handshake packet from {conn!r}: {err}")

    def on_unix_refused(self, cred: tuple) -> None:
        self.stats["refused_uid"] += 1
        plog(logging.WARNING, "refused", "refused a same-host connection from pid %d uid %d: not an allowed "
             "uid %s (%d so far)", cred[0], cred[1], sorted(self.config.peer_uids), self.stats["refused_uid"])

    def _bye(self, hs, reason: str) -> None:
        if isinstance(hs, HsZmq):
            self.refuse(hs.key, reason)
            return
        try:
            hs.reply(P.Bye(clip(reason, 1000)))
        except Exception:
            pass

    def _step(self, hs, msg: P.Register, fds: list) -> bool:
        """One handshake message; False when the handshake failed (the peer was told)."""
        try:
            self._handshake(hs, msg, fds)
            return True
        except Exception as e:
            self.warn_bad(f"handshake with {msg.session_id!r} failed: {e}")
            self.pending.pop(hs.key, None)
            self._bye(hs, f"{type(e).__name__}: {e}")
            return False

    def _handshake(self, hs, msg: P.Register, fds: list) -> None:
        c = self.config
        phase = msg.desc.get("phase")
        if phase == "hello":
            if hs.key in self.pending:
                raise ProtocolError("desc.phase", "a second hello on one connection")
            layout = BlockLayout.from_dict(msg.desc.get("layout", {}))
            if layout.block_size != c.block_size or layout.hidden != c.hidden_size or layout.dtype != c.dtype:
                raise ConfigError(f"pool layout mismatch: language block_size={layout.block_size} "
                                  f"hidden={layout.hidden} dtype={layout.dtype}, encoder block_size={c.block_size} "
                                  f"hidden={c.hidden_size} dtype={c.dtype}")
            offered = msg.desc.get("offer")
            if not isinstance(offered, list) or not all(isinstance(x, str) for x in offered[:16]):
                raise ProtocolError("desc.offer", "expected a list of transport names")
            group = msg.desc.get("group", "")
            if not isinstance(group, str) or len(group) > MAX_GROUP:
                raise ProtocolError("desc.group", f"expected a TP group identity of at most {MAX_GROUP} characters")
            self._check_sessions()          # the endpoint's bound on sessions (PeerError past it)
            chosen = select.choose(c, offered[:16], hs.same_host)
            while len(self.pending) >= MAX_PENDING_HANDSHAKES:   # the oldest half-open hello goes
                self.pending.pop(next(iter(self.pending)))
            self.pending[hs.key] = {"transport": chosen, "t": time.monotonic(), "group": group}
            hs.reply(reply(chosen, {"phase": "hello"}))
            return
        if phase != "pool":
            raise ProtocolError("desc.phase", f"unknown handshake phase {phase!r}")
        state = self.pending.pop(hs.key, None)
        if state is None or state["transport"] != msg.transport:
            raise ProtocolError("transport", "pool description without a matching hello")
        name = state["transport"]
        try:
            desc = unix.unpack_fds(msg.desc, fds)
        except ValueError as e:
            raise ProtocolError("desc", str(e)) from None
        pdesc = desc.get("pool") or {}
        if not isinstance(pdesc, dict):
            raise ProtocolError("desc.pool", "expected an object")
        transport = self._transports.for_desc(name, pdesc)
        try:
            pool = transport.open_peer(pdesc)
        except TransportUnavailable as e:
            # this pair of processes cannot use it: the language side offers the next one
            log.info("transport %s unavailable for %s: %s", name, msg.session_id, e)
            hs.reply(reply(name, {"phase": "retry", "reason": str(e)[:1000]}))
            return
        try:
            if hs.same_host:
                from ..ipc.channel import RingChannel
                from ..ipc.ring import ShmRing
                rings = desc.get("rings")
                if not isinstance(rings, dict) or not all(
                        isinstance(rings.get(k), list) and all(isinstance(x, unix.Fd) for x in rings[k])
                        for k in ("l2e", "e2l")):
                    raise ProtocolError("desc.rings", "expected the two control rings as passed fds")
                tx = ShmRing.from_handles(rings.get("e2l"))
                try:
                    rx = ShmRing.from_handles(rings.get("l2e"))
                except BaseException:
                    tx.close()
                    raise
                # no spinning for a rank in this very process: its answers need our GIL
                channel: Channel = RingChannel(tx=tx, rx=rx, name=f"enc-{msg.session_id}",
                                               spin_us=0 if hs.pid == os.getpid() else self.config.ring_spin_us)
            else:
                channel = ZmqChannel(self.hub, hs.key)
        except BaseException:
            transport.close_peer(pool)
            raise
        # a same-host peer's pid is the kernel's (SO_PEERCRED), not what it claims
        pid = hs.pid if hs.same_host else msg.pid
        self._admit(hs, msg, name, transport, pool, channel, pid, state.get("group", ""))

    def warn_bad(self, text: str) -> None:
        """Rate-limited warning about a frame from a not yet registered peer."""
        self.stats["bad_handshakes"] += 1
        plog(logging.WARNING, "bad_handshake", "%s (%d bad handshake frames so far)", text,
             self.stats["bad_handshakes"])
