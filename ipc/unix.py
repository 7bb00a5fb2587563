"""The same-host handshake socket: a Unix ``SOCK_SEQPACKET`` socket in the
abstract namespace, with the peer's credentials checked and fds passed.

Why a Unix socket (and not the encoder's tcp port) for peers on one host:

* the kernel tells each side who the other is (``SO_PEERCRED``: pid, uid,
  gid, not forgeable): an encoder serves only the uids it allows (by default
  its own), and a language rank only talks to an encoder of an allowed uid;
* shared memory travels as fds (``SCM_RIGHTS``) of sealed memfds
  (:mod:`embresume.ipc.shm`), so no segment has a name another process could
  open, squat or leave behind;
* an abstract name (``@embresume/tcp/<port>``) has no file: it goes away with
  the process, whatever way it ends;
* the connection stays open for the session: its end (EOF) is the moment the
  peer process died or closed, which the kernel reports at once.

Wire format: one handshake message per packet (an encoded
:class:`embresume.protocol.Register` or ``Bye``) of at most
:data:`MAX_PACKET` bytes, with at most :data:`MAX_FDS` fds attached.  In a
message's JSON description an fd is written ``{"$fd": i}``, ``i`` indexing
the packet's fds (:func:`pack_fds` / :func:`unpack_fds`).
"""

from __future__ import annotations

import array
import hashlib
import os
import selectors
import socket
import struct
import threading
import time
from typing import Any, Optional
from urllib.parse import urlsplit

#: the largest handshake packet accepted
MAX_PACKET = 64 * 1024
#: the most fds one packet may carry (a pool and two rings need 7)
MAX_FDS = 16

_CRED = struct.Struct("3i")


class HandshakeSocketError(OSError):
    """A packet that breaks the rules of this socket (size, fds, truncation)."""


class Fd(int):
    """Marks an int in a handshake description as an fd to pass to the peer."""


def socket_name(address: str) -> bytes:
    """The abstract socket name of the encoder bound at ZeroMQ ``address``.

    For ``tcp://host:port`` only the port counts (the host may be any alias
    or address of this machine: ``*``, ``127.0.0.1``, its own IP); for
    ``ipc://`` and ``inproc://`` a hash of the address."""
    if address.startswith("tcp://"):
        port = urlsplit(address).port
        return f"\0embresume/tcp/{port}".encode()
    digest = hashlib.sha256(address.encode()).hexdigest()[:24]
    return f"\0embresume/{address.partition('://')[0] or 'addr'}/{digest}".encode()


def display(name: bytes) -> str:
    return "@" + name[1:].decode(errors="replace") if name.startswith(b"\0") else name.decode(errors="replace")


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it
    when the connection was made (pid 0 when it is outside our pid namespace)."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def listen(name: bytes, backlog: int = 512) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.bind(name)
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def connect(name: bytes, timeout: float) -> socket.socket:
    """Connect to ``name``; raises ConnectionRefusedError/FileNotFoundError when
    nothing listens there (abstract names: ECONNREFUSED), TimeoutError when its
    backlog stays full for ``timeout`` seconds (a Unix socket answers EAGAIN
    at once instead of waiting)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            s.connect(name)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{display(name)}: backlog full for {timeout}s") from None
            time.sleep(0.005)
        except BaseException:
            s.close()
            raise


def send(sock: socket.socket, data: bytes, fds: tuple = ()) -> None:
    if len(data) > MAX_PACKET:
        raise HandshakeSocketError(f"handshake packet of {len(data)} bytes exceeds {MAX_PACKET}")
    if len(fds) > MAX_FDS:
        raise HandshakeSocketError(f"{len(fds)} fds exceed {MAX_FDS} per packet")
    if fds:
        socket.send_fds(sock, [data], [int(f) for f in fds])
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the fds it carried (the caller owns and must close them).

    Returns ``(b"", [])`` at EOF.  A packet that was truncated (too large, or
    more than :data:`MAX_FDS` fds) raises :class:`HandshakeSocketError`, with
    every fd that came with it closed."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_PACKET + 1, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    got = list(fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_PACKET:
        close_all(got)
        raise HandshakeSocketError(f"handshake packet over the limits ({MAX_PACKET} bytes, {MAX_FDS} fds)")
    return data, got


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_blocking(sock: socket.socket, deadline: float) -> tuple[bytes, list[int]]:
    """:func:`recv` with a deadline (``time.monotonic()``); TimeoutError when it passes."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("handshake timed out")
    sock.settimeout(left)
    try:
        return recv(sock)
    except socket.timeout:
        raise TimeoutError("handshake timed out") from None


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed its end (non-blocking check; a pending
    packet counts as open)."""
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


# ------------------------------------------------------------ fds in descriptions
def pack_fds(obj: Any, fds: Optional[list] = None):
    """Replace every :class:`Fd` in ``obj`` (dicts and lists) by ``{"$fd": i}``;
    returns ``(obj', fds)``."""
    fds = [] if fds is None else fds
    if isinstance(obj, Fd):
        fds.append(int(obj))
        return {"$fd": len(fds) - 1}, fds
    if isinstance(obj, dict):
        return {k: pack_fds(v, fds)[0] for k, v in obj.items()}, fds
    if isinstance(obj, (list, tuple)):
        return [pack_fds(v, fds)[0] for v in obj], fds
    return obj, fds


def unpack_fds(obj: Any, fds: list, _used: Optional[set] = None):
    """Replace ``{"$fd": i}`` by the received fd ``fds[i]`` (as an :class:`Fd`:
    a plain int in a description is a number the peer wrote, never an fd of
    ours to use); an index out of range or used twice raises ValueError.  Fds the description does not
    reference stay in ``fds`` (the caller closes them all afterwards)."""
    used = set() if _used is None else _used
    if isinstance(obj, dict):
        if set(obj) == {"$fd"}:
            i = obj["$fd"]
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(fds) or i in used:
                raise ValueError(f"bad fd reference {obj!r} ({len(fds)} fds came with the packet)")
            used.add(i)
            return Fd(fds[i])
        return {k: unpack_fds(v, fds, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_fds(v, fds, used) for v in obj]
    return obj


# ------------------------------------------------------------ the listening side
class Conn:
    """One accepted connection: the peer's kernel credentials, a send method
    and ``established`` (set by the owner once the handshake completed; until
    then the connection counts against the pending bound and the deadline)."""

    def __init__(self, server: "Server", sock: socket.socket, cred: tuple[int, int, int]):
        self.server = server
        self.sock = sock
        self.pid, self.uid, self.gid = cred
        self.t0 = time.monotonic()
        self.established = False
        self.closed = False
        self.owner: Any = None              # whatever the server's user attaches

    def send(self, data: bytes, fds: tuple = ()) -> None:
        if self.closed:
            raise HandshakeSocketError("connection is closed")
        self.sock.setblocking(True)
        self.sock.settimeout(1.0)           # a peer that does not read cannot stall us
        try:
            send(self.sock, data, fds)
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self.server._drop(self)

    def __repr__(self) -> str:
        return f"<unix peer pid={self.pid} uid={self.uid}>"


class Server:
    """Accepts connections on an abstract Unix socket on its own thread.

    * a peer whose uid is not in ``allowed_uids`` is closed at once (it learns
      nothing; ``on_refused(cred)`` is told);
    * at most ``max_pending`` connections may be between accept and
      ``established``; the oldest goes when a new one comes, and any is closed
      ``pending_timeout`` seconds after it was accepted;
    * each packet goes to ``on_packet(conn, data, fds)`` (the callee owns the
      fds), a packet over the limits to ``on_bad(conn, err)`` and the
      connection is closed; EOF or an error to ``on_closed(conn)``.
    """

    def __init__(self, name: bytes, *, allowed_uids, on_packet, on_closed, on_bad=None, on_refused=None,
                 max_pending: int = 256, max_conns: int = 4096, pending_timeout: float = 10.0,
                 thread_name: str = "embresume-unix"):
        self.name = name
        self.allowed_uids = frozenset(allowed_uids)
        self._on_packet, self._on_closed = on_packet, on_closed
        self._on_bad, self._on_refused = on_bad, on_refused
        self.max_pending, self.max_conns, self.pending_timeout = max_pending, max_conns, pending_timeout
        self._sock = listen(name)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: dict[int, Conn] = {}           # fileno -> conn, in accept order
        self._lock = threading.Lock()
        self._stop = False
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                events = self._sel.select(0.25)
            except (OSError, ValueError):
                break
            for key, _ in events:
                if key.fileobj is self._sock:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                else:
                    self._readable(key.data)
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._conns.values() if not c.established and now - c.t0 > self.pending_timeout]
            for c in late:
                self._drop(c, notify=True)

    def _accept(self) -> None:
        for _ in range(64):                 # a burst of connections, bounded per wake-up
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                cred = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            if cred[1] not in self.allowed_uids:
                sock.close()
                self.refused += 1
                if self._on_refused is not None:
                    self._on_refused(cred)
                continue
            sock.setblocking(False)
            conn = Conn(self, sock, cred)
            with self._lock:
                pending = [c for c in self._conns.values() if not c.established]
                oldest = pending[0] if len(pending) >= self.max_pending else None
                full = len(self._conns) >= self.max_conns
            if full:
                sock.close()
                continue
            if oldest is not None:
                self._drop(oldest, notify=True)
            with self._lock:
                self._conns[sock.fileno()] = conn
            try:
                self._sel.register(sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):
                self._drop(conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data, fds = recv(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except HandshakeSocketError as e:
            if self._on_bad is not None:
                self._on_bad(conn, e)
            self._drop(conn, notify=True)
            return
        except OSError:
            data, fds = b"", []
        if not data:
            close_all(fds)
            self._drop(conn, notify=True)
            return
        try:
            self._on_packet(conn, data, fds)
        except Exception as e:  # the owner's bug must not stop the server
            close_all(fds)
            if self._on_bad is not None:
                self._on_bad(conn, e)
            self._drop(conn, notify=True)

    def _drop(self, conn: Conn, notify: bool = False) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            self._conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.close()
        if notify:
            try:
                self._on_closed(conn)
            except Exception:
                pass

    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            self._drop(c)
        self._sel.close()
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
