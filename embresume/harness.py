"""Run an encoder endpoint in a child process (spawn) and drive it.

Used by the demo, the tests and the benchmarks; also handy for users' own
integration tests.  Every wait is bounded; the child is terminated on close.
Parent and child talk over pipes (:class:`~embresume.procutil.PipeQueue`), not
``multiprocessing`` queues: a SIGKILL of the whole process group leaves no
named semaphore in /dev/shm.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import traceback
from typing import Optional

from .config import Config


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a loopback encoder endpoint)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _encoder_child(config: Config, cmd_q, res_q, data_spec: Optional[tuple], log_level: Optional[int] = None) -> None:
    from .procutil import die_with_parent
    die_with_parent()  # never outlive the test, demo or bench that started us
    import logging
    if log_level is not None:   # the parent's log level and format (the demo's -v)
        logging.basicConfig(level=log_level, format=LOG_FORMAT)
        logging.getLogger("embresume").setLevel(log_level)

    import torch  # noqa: F401  (import cost paid before the ready message)
    from .encoder import EncoderEndpoint
    from .synthetic import SyntheticData

    try:
        data = SyntheticData(*data_spec) if data_spec else None
        enc = EncoderEndpoint(config)
    except Exception as e:  # report start-up failures instead of hanging the parent
        res_q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    res_q.put(("ready", enc.address))
    try:
        while True:
            try:
                cmd = cmd_q.get(timeout=1.0)
            except queue.Empty:
                continue
            op = cmd[0]
            if op == "stop":
                # the parent asked: rooms still in flight end with the endpoint, nothing to warn about
                lg = logging.getLogger("embresume")
                if lg.getEffectiveLevel() >= logging.WARNING:
                    lg.setLevel(logging.ERROR)
                break
            try:
                if op == "send":
                    _, room, tokens = cmd
                    e, f, m, d = data.sample(room, tokens)
                    enc.send_tensors(room, e, f, m, d)
                elif op == "send_many":
                    for room, tokens in cmd[1]:
                        e, f, m, d = data.sample(room, tokens)
                        enc.send_tensors(room, e, f, m, d)
                elif op == "drain":
                    enc.drain(cmd[1])
                    res_q.put(("drain", True))
                elif op == "stats":
                    res_q.put(("stats", dict(enc.stats), enc.peers()))
                elif op == "poll":
                    try:
                        res_q.put(("poll", enc.poll(cmd[1]).name))
                    except KeyError:
                        res_q.put(("poll", None))
                elif op == "crash":
                    import os
                    os._exit(17)
            except Exception as e:
                res_q.put(("error", f"{type(e).__name__}: {e}"))
    finally:
        enc.close()


class EncoderProcess:
    """An :class:`EncoderEndpoint` serving synthetic data in a spawned child."""

    def __init__(self, config: Config, data_spec: Optional[tuple] = None, start_timeout: float = 60.0,
                 log_level: Optional[int] = None):
        """``log_level``: the child's logging level (its lines in the parent's
        format); None leaves Python's default (warnings and errors, bare)."""
        from .procutil import PipeQueue, start_child
        ctx = mp.get_context("spawn")
        self.cmd_q = PipeQueue(ctx)
        self.res_q = PipeQueue(ctx)
        self.proc = ctx.Process(target=_encoder_child, args=(config, self.cmd_q, self.res_q, data_spec, log_level),
                                daemon=True, name="embresume-encoder")
        start_child(self.proc)   # SIGINT ignored: a Ctrl-C is the parent's to handle
        try:
            msg = self.res_q.get(timeout=start_timeout)
        except queue.Empty:
            self.close()
            raise TimeoutError("encoder process did not start in time") from None
        except KeyboardInterrupt:
            self.close(timeout=0)   # interrupted while the child starts: no waiting for it
            raise
        if msg[0] != "ready":
            self.close()
            raise RuntimeError(f"encoder process failed to start: {msg[1]}")
        self.address = msg[1]

    def send(self, room, tokens: int) -> None:
        self.cmd_q.put(("send", room, tokens))

    def send_many(self, items) -> None:
        self.cmd_q.put(("send_many", list(items)))

    def request(self, op: str, *args, timeout: float = 10.0):
        self.cmd_q.put((op, *args))
        while True:
            msg = self.res_q.get(timeout=timeout)
            if msg[0] == op:
                return msg[1:]
            if msg[0] == "error":
                raise RuntimeError(msg[1])

    def stats(self, timeout: float = 10.0):
        return self.request("stats", timeout=timeout)

    def crash(self) -> None:
        self.cmd_q.put(("crash",))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.is_alive():
            try:
                self.cmd_q.put(("stop",))
            except Exception:
                pass
            self.proc.join(timeout=timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        for q in (self.cmd_q, self.res_q):
            q.close()
            q.cancel_join_thread()

    def __enter__(self) -> "EncoderProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _language_child(config: Config, room: int, res_q, report_status: str) -> None:
    """A language rank that requests ``room`` and reports when it reaches ``report_status``."""
    import time

    from .language import LanguageEndpoint
    from .procutil import die_with_parent
    from .status import Status

    die_with_parent()
    try:
        lang = LanguageEndpoint(config)
        lang.request(room)
        target = Status[report_status]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = lang.poll(room)
            if st is target or st.terminal:
                res_q.put(("status", st.name, dict(lang.stats)))
                break
            time.sleep(0.0005)
        time.sleep(60)  # stay alive until the parent kills us
    except Exception as e:
        res_q.put(("error", f"{type(e).__name__}: {e}"))


class LanguageProcess:
    """A language rank in a spawned child (used by the peer-death tests)."""

    def __init__(self, config: Config, room: int, report_status: str = "Transferring"):
        from .procutil import PipeQueue, start_child
        ctx = mp.get_context("spawn")
        self.res_q = PipeQueue(ctx)
        self.proc = ctx.Process(target=_language_child, args=(config, room, self.res_q, report_status),
                                daemon=True, name="embresume-language")
        start_child(self.proc)

    def wait_report(self, timeout: float = 60.0):
        return self.res_q.get(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)

    def close(self) -> None:
        if self.proc.is_alive():
            self.kill()
        self.res_q.close()
        self.res_q.cancel_join_thread()

    def __enter__(self) -> "LanguageProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
