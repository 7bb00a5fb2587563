"""Authenticated handshakes over TCP: ZeroMQ CURVE with keys derived from a shared secret.

Both sides know ``Config.auth_key`` (or ``EMBRESUME_AUTH_KEY``).  From it each
derives, with HKDF-SHA256, the same two CURVE key pairs: the encoder's (server)
and the language side's (client).  The encoder's ROUTER is a CURVE server
that accepts only the derived client key (checked by a ZAP handler); the
language side's DEALER knows the derived server key.  So:

* the secret never travels, not even hashed: CURVE is a challenge-response
  over Curve25519, and a peer that does not know the secret cannot complete
  it (it cannot derive the server's key, nor present the client's);
* before the CURVE handshake completes a peer can send nothing that reaches
  embresume, so it learns nothing (no room's existence, no layout);
* everything on the connection afterwards (handshake and, for Mooncake peers,
  control messages) is encrypted and authenticated.

What it does not cover: the Mooncake Transfer Engine's own data ports (see
README, "Security"), and same-host shm memory, which is protected by file
modes (0600) and the uid check.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from typing import Optional

import zmq
from zmq.utils import z85

from .errors import ConfigError

_SALT = b"embresume-curve-v1"
MIN_KEY_BYTES = 16


def _hkdf(secret: bytes, info: bytes, n: int = 32) -> bytes:
    prk = hmac.new(_SALT, secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < n:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:n]


class CurveKeys:
    """The two CURVE key pairs derived from one secret (Z85-encoded bytes)."""

    def __init__(self, secret):
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_KEY_BYTES:
            raise ConfigError(f"auth_key must be at least {MIN_KEY_BYTES} bytes (use a random string, "
                              "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if not zmq.has("curve"):  # pragma: no cover - pyzmq wheels ship libsodium
            raise ConfigError("this libzmq has no CURVE support: auth_key cannot be used")
        self.server_secret = z85.encode(_hkdf(bytes(secret), b"server"))
        self.server_public = zmq.curve_public(self.server_secret)
        self.client_secret = z85.encode(_hkdf(bytes(secret), b"client"))
        self.client_public = zmq.curve_public(self.client_secret)


# one ZAP authenticator per context; each server socket has its own domain and key
_zap_lock = threading.Lock()
_zap = None
_allowed: dict[str, bytes] = {}


class _Provider:
    def callback(self, domain: str, key: bytes) -> bool:
        want = _allowed.get(domain)
        return want is not None and hmac.compare_digest(want, z85.encode(key) if len(key) == 32 else key)


def make_server(sock: zmq.Socket, keys: CurveKeys, domain: str) -> None:
    """Turn ``sock`` (before bind) into a CURVE server accepting only ``keys``' client."""
    global _zap
    with _zap_lock:
        if _zap is None:
            from zmq.auth.thread import ThreadAuthenticator
            _zap = ThreadAuthenticator(sock.context, log=None)
            _zap.start()
        _allowed[domain] = keys.client_public
        _zap.configure_curve_callback(domain=domain, credentials_provider=_Provider())
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True


def forget_server(domain: str) -> None:
    with _zap_lock:
        _allowed.pop(domain, None)


def make_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Turn ``sock`` (before connect) into a CURVE client of ``keys``' server."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


def keys_for(config) -> Optional[CurveKeys]:
    secret = getattr(config, "auth_key", None)
    return CurveKeys(secret) if secret else None


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints bound to a loopback address, and for ipc/inproc."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
