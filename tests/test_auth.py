"""Authenticated TCP handshakes (ZeroMQ CURVE keys derived from Config.auth_key)."""


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


@pytest.fixture
def remote(monkeypatch):
    """The language side treats the encoder as on another host: its handshake
    goes over tcp (as across nodes), not over the encoder's Unix socket."""
    from embresume.transport import select
    monkeypatch.setattr(select, "is_local", lambda endpoint: False)


def test_same_key_connects_and_moves_data(remote):
    try:
        import embresume.transport.mooncake  # noqa: F401
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as e:
        pytest.skip(f"a tcp peer needs the Mooncake transport: {e}")
    cfg = make_config("mooncake", auth_key=KEY)
    data = SyntheticData(256, "bf16", 4000, seed=2)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        assert lang.transport_name == "mooncake" and lang.channel.kind == "zmq"
        e, f, m, d = data.sample(7, 3000)
        enc.send_tensors(7, e, f, m, d)
        assert data.verify(7, lang.recv(7, timeout=20))


def test_wrong_or_missing_key_learns_nothing(remote):
    cfg = make_config("mooncake", auth_key=KEY)
    with EncoderEndpoint(cfg) as enc:
        enc.send_tensors(1, *SyntheticData(256, "bf16", 100, seed=2).sample(1, 50)[:3])
        with pytest.raises(PeerError, match="auth_key"):
            LanguageEndpoint(cfg.replace(auth_key=KEY + " but wrong", handshake_timeout=1.5))
        with pytest.raises(PeerError, match="needs an auth_key"):   # no key: not even tried
            LanguageEndpoint(cfg.replace(auth_key=None, handshake_timeout=1.5))
        # a raw client without the keys gets no byte back, not even a refusal
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(enc.address)
        s.send(P.encode(P.Register(P.Role.LANGUAGE, "intruder", "n", 1, 0, "", {"phase": "hello"})))
        assert s.poll(1000) == 0
        s.close()
        assert enc.peers() == []


def test_keyless_encoder_refuses_every_tcp_handshake():
    """Without a key the tcp port is anyone's who reaches it (any uid on this
    host): the encoder answers a hello with a refusal that names no room and
    no layout, and only peers on its Unix socket (uid checked) get in."""
    cfg = make_config("shm")
    data = SyntheticData(256, "bf16", 4000, seed=3)
    with EncoderEndpoint(cfg) as enc:
        for room in range(5):
            enc.send_tensors(room, *data.sample(room, 300))
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(enc.address)
        hello = {"phase": "hello", "layout": {"num_blocks": 64, "block_size": 128, "hidden": 256, "dtype": "bf16",
                                              "aux_ints": 16}, "offer": ["shm", "mooncake"]}
        s.send(P.encode(P.Register(P.Role.LANGUAGE, "thief", "n", 1, 0, "", hello)))
        assert s.poll(5000)
        bye = P.decode(s.recv())
        assert isinstance(bye, P.Bye) and "auth_key" in bye.reason and "room" not in bye.reason
        s.send(P.encode(P.Init(0, "n", 0, "thief", (0,), 1, 128, 1)))    # an INIT gets nothing either
        assert s.poll(500) == 0
        s.close()
        assert enc.peers() == []
        with LanguageEndpoint(cfg) as lang:                             # the same-host rank is served
            assert lang.channel.kind == "shm-ring"
            for room in range(5):
                assert data.verify(room, lang.recv(room, timeout=20))


def test_non_loopback_bind_needs_a_key():
    port = free_port()
    with pytest.raises(ConfigError, match="auth_key"):
        EncoderEndpoint(make_config("shm", encoder_endpoint=f"tcp://0.0.0.0:{port}"))
    with EncoderEndpoint(make_config("shm", encoder_endpoint=f"tcp://0.0.0.0:{port}", auth_key=KEY)):
        pass
    assert is_loopback("tcp://127.0.0.1:5") and is_loopback("tcp://[::1]:5") and not is_loopback("tcp://*:5")
