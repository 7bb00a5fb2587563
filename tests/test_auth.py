"""Authenticated TCP handshakes (ZeroMQ CURVE keys derived from Config.auth_key)."""

import time

import pytest
import zmq

from embresume import protocol as P
from embresume.auth import CurveKeys, is_loopback
from embresume.encoder import EncoderEndpoint
from embresume.errors import ConfigError, PeerError
from embresume.harness import free_port
from embresume.language import LanguageEndpoint
from embresume.synthetic import SyntheticData

from conftest import make_config

KEY = "correct horse battery staple 0123456789"


def test_keys_are_derived_not_random_and_differ_per_secret():
    a, b, c = CurveKeys(KEY), CurveKeys(KEY), CurveKeys(KEY + "x")
    assert a.server_public == b.server_public and a.client_public == b.client_public
    assert a.server_public != c.server_public and a.server_public != a.client_public
    with pytest.raises(ConfigError, match="at least"):
        CurveKeys("short")


def test_same_key_connects_and_moves_data():
    cfg = make_config("shm", auth_key=KEY)
    data = SyntheticData(256, "bf16", 4000, seed=2)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        e, f, m, d = data.sample(7, 3000)
        enc.send_tensors(7, e, f, m, d)
        assert data.verify(7, lang.recv(7, timeout=20))


@pytest.mark.parametrize("lang_key", [None, KEY + " but wrong"])
def test_wrong_or_missing_key_learns_nothing(lang_key):
    cfg = make_config("shm", auth_key=KEY)
    with EncoderEndpoint(cfg) as enc:
        enc.send_tensors(1, *SyntheticData(256, "bf16", 100, seed=2).sample(1, 50)[:3])
        with pytest.raises(PeerError, match="auth_key"):
            LanguageEndpoint(cfg.replace(auth_key=lang_key, handshake_timeout=1.5))
        # a raw client without the keys gets no byte back, not even a refusal
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(enc.address)
        s.send(P.encode(P.Register(P.Role.LANGUAGE, "intruder", "n", 1, 0, "", {"phase": "hello"})))
        assert s.poll(1000) == 0
        s.close()
        assert enc.peers() == []


def test_non_loopback_bind_needs_a_key():
    port = free_port()
    with pytest.raises(ConfigError, match="auth_key"):
        EncoderEndpoint(make_config("shm", encoder_endpoint=f"tcp://0.0.0.0:{port}"))
    with EncoderEndpoint(make_config("shm", encoder_endpoint=f"tcp://0.0.0.0:{port}", auth_key=KEY)):
        pass
    assert is_loopback("tcp://127.0.0.1:5") and is_loopback("tcp://[::1]:5") and not is_loopback("tcp://*:5")
