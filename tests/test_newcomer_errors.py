"""Errors a new user meets in the first hour, found at the call with a message
that says what to do: Config values, CLI values, released results, status
names, the package's error types, the example without an encoder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from conftest import child_env
import torch

import embresume
from embresume import Config, ConfigError, Status, cli
from embresume.config import as_config, check_endpoint
from embresume.merge import EmbeddingResult

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_env = child_env


# ---------------------------------------------------------------- Config
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "foo", "127.0.0.1:17600",
                                      "tcp://127.0.0.1", "tcp://:17600", "tcp://127.0.0.1:x", "ipc:///tmp/x",
                                      "tcp://a b:1", "tcp://[::1:5"])
def test_bad_encoder_endpoint_fails_at_construction(endpoint):
    with pytest.raises(ConfigError, match="encoder_endpoint must be tcp://HOST:PORT"):
        Config(encoder_endpoint=endpoint)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:17600", "tcp://*:17600", "tcp://0.0.0.0:1",
                                      "tcp://[::1]:65535", "tcp://encoder-0.example:5000"])
def test_good_encoder_endpoints(endpoint):
    assert Config(encoder_endpoint=endpoint).encoder_endpoint == endpoint
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("var,value", [("EMBRESUME_BLOCK_SIZE", "-4"), ("EMBRESUME_BLOCK_SIZE", "0"),
                                       ("EMBRESUME_CACHE_BUFFERS", "-1"), ("EMBRESUME_DEFAULT_ALLOCATE_TOKENS", "x"),
                                       ("SGLANG_MULTIMODAL_BLOCK_SIZE", "-4"), ("EMBRESUME_RING_SPIN_US", "-1")])
def test_bad_environment_value_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        Config()
    assert var in str(e.value) and repr(value) in str(e.value), str(e.value)


def test_explicit_bad_value_names_the_field():
    with pytest.raises(ConfigError, match="block_size must be a positive integer"):
        Config(block_size=-4)


def test_default_allocation_rounds_up_to_whole_blocks(caplog):
    """Documented choice: a request gets whole blocks anyway, so a default
    allocation that is not a multiple of block_size is rounded up, with a warning."""
    with caplog.at_level(logging.WARNING, logger="embresume.config"):
        c = Config(default_allocate_tokens=100, block_size=128)
    assert c.default_allocate_tokens == 128 and c.blocks_per_default_allocation == 1
    assert any("rounded up to 128" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embresume.config"):
        assert Config(default_allocate_tokens=1024, block_size=128).default_allocate_tokens == 1024
        assert c.replace(hidden_size=64).default_allocate_tokens == 128
    assert not caplog.records


def test_endpoint_given_a_dict_says_how_to_call_it():
    assert isinstance(as_config(None, "LanguageEndpoint"), Config)
    c = Config()
    assert as_config(c, "LanguageEndpoint") is c
    with pytest.raises(TypeError, match=r"LanguageEndpoint takes a Config, not a dict: use LanguageEndpoint\(Config"):
        as_config({"hidden_size": 64}, "LanguageEndpoint")
    with pytest.raises(TypeError, match="takes an embresume.Config, got int"):
        as_config(3, "EncoderEndpoint")


# ---------------------------------------------------------------- results, statuses, exports
def _result() -> EmbeddingResult:
    return EmbeddingResult("img-0", torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32),
                           torch.zeros(3, 3, dtype=torch.int32), torch.zeros(16, dtype=torch.int32))


def test_released_result_says_so():
    res = _result()
    assert res.total_tokens == 3 and not res.released
    res.release()
    res.release()                                   # idempotent
    assert res.released and "released" in repr(res)
    for name in ("embeddings", "fill_ids", "mrope_positions", "total_tokens"):
        with pytest.raises(embresume.ResultReleased, match="after release"):
            getattr(res, name)
    with pytest.raises(AttributeError):
        res.no_such_attribute                       # noqa: B018


def test_status_prints_its_name(capsys):
    print(Status.Success, Status.Transferring)
    assert capsys.readouterr().out == "Success Transferring\n"
    assert f"{Status.Failed}" == "Failed" and f"{Status.Success:d}" == "4" and int(Status.Bootstrapping) == 1
    assert Status(4) is Status.Success and Status.Success == 4


def test_error_types_named_in_the_readme_are_exported():
    from embresume import (EmbResumeError, EmbResumeTimeout, InvalidArgument, PeerError,  # noqa: F401
                           TransferFailed, UnknownRoom)
    assert issubclass(InvalidArgument, ValueError) and issubclass(EmbResumeTimeout, TimeoutError)
    for name in ("InvalidArgument", "EmbResumeTimeout", "TransferFailed", "ConfigError", "ResultReleased"):
        assert name in embresume.__all__


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("argv,needle", [
    (["demo", "--pool-bytes", "-1M"], "--pool-bytes: size must be positive"),
    (["demo", "-n", "-5"], "must be at least 1"),
    (["bench", "--sizes", "-3"], "expected positive integers"),
])
def test_negative_values_are_checked_not_taken_for_options(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_example_language_without_encoder_is_one_line():
    from embresume.harness import free_port
    port = free_port()
    r = subprocess.run([sys.executable, os.path.join(REPO, "examples", "language.py"), "--endpoint",
                        f"tcp://127.0.0.1:{port}", "--wait", "1"], capture_output=True, text=True, timeout=60,
                       env=_env(), cwd=REPO)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no encoder listens at" in err[0] and "examples/encoder.py" in err[0], r.stderr
