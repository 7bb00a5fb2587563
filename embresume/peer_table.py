"""The encoder endpoint's table of connected language ranks (sessions).

Each rank's connection (the endpoint's ``_Peer``) is found by its session id
and, when it came over ZeroMQ, by its ZeroMQ identity (the frames of remote
ranks arrive on one socket, named by identity).  A same-host rank's Unix
socket connection points at its peer instead (``conn.owner``).  The endpoint
changes the table under its lock: :meth:`PeerTable.add` when a handshake
completed, :meth:`PeerTable.remove` when the rank is gone.
"""

from __future__ import annotations

from typing import Optional


class PeerTable:
    """Connected ranks by session id (``by_session``) and by ZeroMQ identity
    (``by_ident``); at most ``limit`` sessions."""

    __slots__ = ("by_session", "by_ident", "limit")

    def __init__(self, limit: int) -> None:
        self.by_session: dict = {}
        self.by_ident: dict = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self.by_session)

    def refusal(self, session_id: str, closing: bool) -> Optional[str]:
        """Why a session that finished its handshake cannot be admitted (None: it can)."""
        if closing:
            return "encoder endpoint is closing"
        if session_id in self.by_session:
            # a session id is bound to the connection that registered it
            return f"session {session_id!r} is already connected"
        if len(self.by_session) >= self.limit:
            return f"this encoder already serves {self.limit} sessions"
        return None

    def add(self, peer, hs) -> None:
        """``peer`` finished its handshake ``hs`` (over a Unix socket connection, or ZeroMQ)."""
        self.by_session[peer.session_id] = peer
        if hs.conn is not None:
            hs.conn.owner = peer
            hs.conn.established = True
        else:
            self.by_ident[hs.key] = peer

    def remove(self, peer) -> None:
        if self.by_session.get(peer.session_id) is peer:
            del self.by_session[peer.session_id]
        for ident, p in list(self.by_ident.items()):
            if p is peer:
                del self.by_ident[ident]

    def alive(self) -> int:
        return sum(p.alive for p in self.by_session.values())
