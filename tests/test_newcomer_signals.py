"""The pieces behind "a killed or terminated demo leaves nothing":
procutil.PipeQueue (the harness's queues: a pipe, no named semaphore in
/dev/shm) and SIGTERM handled like Ctrl-C by the command line (one line,
exit 143).  The end-to-end checks are in test_newcomer_demo.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time

import pytest

from embresume import cli
from embresume.procutil import PipeQueue, Terminated, sigterm_interrupts


def _shm_inodes() -> set:
    """Inodes of the /dev/shm files this process has mapped (named semaphores: sem.*)."""
    with open("/proc/self/maps") as f:
        rows = [line.split(None, 5) for line in f]
    return {int(r[4]) for r in rows if len(r) == 6 and r[5].startswith("/dev/shm/")}


def _echo_child(cmd_q, res_q) -> None:
    while True:
        msg = cmd_q.get(timeout=30)
        if msg == "stop":
            break
        res_q.put(("echo", msg))
    for i in range(3):               # put right before the child exits: flushed at exit
        res_q.put(("last", i, b"x" * 200_000))


def test_pipe_queue_round_trip_with_a_spawned_child_names_nothing():
    before = _shm_inodes()
    ctx = mp.get_context("spawn")
    cmd_q, res_q = PipeQueue(ctx), PipeQueue(ctx)
    p = ctx.Process(target=_echo_child, args=(cmd_q, res_q), daemon=True)
    p.start()
    try:
        assert _shm_inodes() == before, "a PipeQueue mapped something in /dev/shm"
        with pytest.raises(queue.Empty):
            res_q.get(timeout=0.05)
        big = bytes(range(256)) * 4096          # 1 MiB: more than a pipe holds
        for i in range(5):
            cmd_q.put((i, big))                 # never blocks, whatever the child does
        for i in range(5):
            assert res_q.get(timeout=60) == ("echo", (i, big))
        cmd_q.put("stop")
        assert [res_q.get(timeout=60)[:2] for _ in range(3)] == [("last", 0), ("last", 1), ("last", 2)]
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(10)
        for q in (cmd_q, res_q):
            q.close()
            q.cancel_join_thread()
    with pytest.raises(ValueError):
        cmd_q.put("closed")


def test_pipe_queue_put_does_not_block_without_a_reader():
    q = PipeQueue(mp.get_context("spawn"))
    try:
        t0 = time.monotonic()
        for _ in range(64):
            q.put(b"y" * 65536)                 # 4 MiB, nobody reading yet
        assert time.monotonic() - t0 < 5
        # every message arrives, in order; the feeder writes each next one only once the
        # reader has made room (a get_nowait right after a get raced it on a loaded machine)
        for _ in range(64):
            assert q.get(timeout=10) == b"y" * 65536
        with pytest.raises(queue.Empty):
            q.get_nowait()
    finally:
        q.close()
        q.cancel_join_thread()


def test_sigterm_interrupts_raises_terminated_once_and_restores_the_handler():
    old = signal.getsignal(signal.SIGTERM)
    with sigterm_interrupts() as term:
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(5)                       # not reached: raised at once
        assert term.hit and isinstance(Terminated(), KeyboardInterrupt)
        signal.raise_signal(signal.SIGTERM)     # a second one while cleaning up: ignored
    assert signal.getsignal(signal.SIGTERM) is old


def test_sigterm_while_torch_imports_takes_effect_after():
    with sigterm_interrupts():
        with pytest.raises(Terminated):
            with cli._SignalsDeferred():
                signal.raise_signal(signal.SIGTERM)
                done = True                     # the block runs to its end
        assert done


def test_cli_sigterm_is_one_line_and_143(monkeypatch, capsys):
    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                           # not reached
        return 0

    monkeypatch.setattr(cli, "_main", terminated)
    old = signal.getsignal(signal.SIGTERM)
    assert cli.main(["demo"]) == 143
    assert capsys.readouterr().err.splitlines() == ["embresume: terminated (SIGTERM)"]
    assert signal.getsignal(signal.SIGTERM) is old

    def reports_itself(argv):                   # as the bench does: its own line, 130
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            return 130
        return 0

    monkeypatch.setattr(cli, "_main", reports_itself)
    assert cli.main(["bench"]) == 143


def _ctrl_c_in_child_start(out) -> None:
    """(a spawned process, so the test's own SIGINT handling is untouched) A SIGINT sent
    while sigint_ignored() is in force reaches the handler when the block ends."""
    import signal as s
    import time as t

    from embresume.procutil import sigint_ignored
    s.signal(s.SIGINT, s.default_int_handler)
    got = []
    try:
        with sigint_ignored():
            os.kill(os.getpid(), s.SIGINT)
            t.sleep(0.05)
            got.append("block ran to its end")
        t.sleep(0.5)
        got.append("not interrupted")
    except KeyboardInterrupt:
        got.append("KeyboardInterrupt after the block")
    out.put(got)


def test_a_ctrl_c_while_a_child_starts_is_not_lost():
    """sigint_ignored() (children started in it ignore SIGINT) keeps a Ctrl-C that comes
    meanwhile pending for the parent.  Before: SIGINT was ignored in the parent too, and a
    bench interrupted one second in, while starting its encoder, ran to its end (exit 0)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_ctrl_c_in_child_start, args=(out,))
    p.start()
    try:
        assert out.get(timeout=60) == ["block ran to its end", "KeyboardInterrupt after the block"]
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
