"""``embresume demo``: an encoder process and a language process on this host.

Sends N requests whose token counts follow a realistic image/video mix plus
the edge cases, verifies every merged result bit for bit and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import logging
import random
import signal
import statistics
import sys
import time
import traceback
from typing import Optional

from .cli import dtype_arg, int_arg, local_endpoint, positive_int, size_arg

DESCRIPTION = """\
Starts an encoder process and a language process on this host, sends N
requests whose token counts follow an image/video mix (28x28 patches) plus the
edge cases (1 token, one more than the default allocation, several times it),
verifies every merged result bit for bit and prints requests, resumes, bytes,
GB/s, p50/p99 latency and "verified N/N".  Exits 1 on any mismatch or when
the encoder process dies (one line says how), 130 on Ctrl-C, 143 on SIGTERM
(one line; the encoder is stopped, nothing is left behind).  Progress shows
the rate and the time left; piped, a progress line every 5 seconds.  Token
counts are drawn as the demo goes, so -n 100000000 needs no more memory than
-n 200 (the latency percentiles then come from a uniform sample of 100,000)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--requests", type=positive_int, default=200, metavar="N",
                   help="number of requests (default 200)")
    p.add_argument("--hidden", type=positive_int, default=1024, metavar="H", help="hidden size (default 1024)")
    p.add_argument("--dtype", type=dtype_arg, default="bf16",
                   help="embedding dtype: bf16, fp16, fp32, float64 (default bf16)")
    p.add_argument("--transport", default="shm", choices=["auto", "shm", "cuda_ipc", "mooncake"],
                   help="data path (default shm, the same-host CPU path; cuda_ipc needs a GPU; "
                        "mooncake over tcp on loopback)")
    p.add_argument("--inflight", type=positive_int, default=8, metavar="K",
                   help="requests in flight at once (default 8)")
    p.add_argument("--cache-buffers", type=positive_int, default=4, metavar="B",
                   help="receive pool size in default allocations of 8192 tokens (default 4)")
    p.add_argument("--pool-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="receive pool size in bytes instead, e.g. 32M or 1G (overrides --cache-buffers)")
    p.add_argument("--seed", type=int_arg, default=0, help="seed of the token counts and the data (default 0)")
    p.add_argument("--endpoint", type=local_endpoint, default=None, metavar="tcp://HOST:PORT",
                   help="the encoder's ZeroMQ endpoint on this host (default: a free loopback port)")


def _error(msg: str, code: int = 1) -> int:
    print(f"embresume: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return code


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def run(args: argparse.Namespace, console=None) -> int:
    """Run the demo; runtime errors become one line on stderr (exit 1, 2 for configuration)."""
    from .errors import ConfigError, EmbResumeError, InvalidArgument, NoMemory
    verbose = getattr(args, "verbose", 0)
    try:
        return _run(args, console)
    except (ConfigError, InvalidArgument) as e:
        if verbose:
            traceback.print_exc()
        hint = ""
        if isinstance(e, NoMemory):
            hint = " (demo: use --cache-buffers 1, --pool-bytes 32M or --hidden 512)"
        return _error(f"{e}{hint}", 2)
    except EncoderDied as e:
        return _error(str(e))
    except EmbResumeError as e:
        if verbose:
            traceback.print_exc()
        return _error(f"{type(e).__name__}: {_first_line(e)}")
    except (RuntimeError, TimeoutError, OSError) as e:
        if verbose:
            traceback.print_exc()
        return _error(f"{_first_line(e)}" + ("" if verbose else " (run with -v for details)"))


class _QuietLibrary(logging.Filter):
    """Holds back the library's per-room warnings while the demo runs (the demo
    counts failures and reports them itself, in one line each); -v shows them."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("embresume.") and record.levelno < logging.CRITICAL:
            self.held += 1
            return False
        return True


class _Ticker:
    """Progress for a pipe or a file: one plain line every ``every`` seconds
    (done, rate, ETA); nothing in between."""

    def __init__(self, total: int, every: float = 5.0):
        self.total, self.every = total, every
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(progress_line(done, self.total, now - self.t0), flush=True)


def progress_line(done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (f"transferring {done:,}/{total:,} ({100.0 * done / total:.1f}%), {rate:,.0f} requests/s, "
            f"ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "unknown"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (signal {-code})"
    return f"exited with code {code}"


class EncoderDied(RuntimeError):
    """The demo's encoder child exited while requests were in flight."""


#: latency samples kept for the percentiles (a uniform sample of all requests beyond this)
LATENCY_SAMPLES = 100_000
#: no request finished for this long: give up on the rest
STALL_SECONDS = 90.0


def _run(args: argparse.Namespace, console=None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from .config import Config
    from .errors import ConfigError
    from .harness import EncoderProcess, free_port
    from .language import LanguageEndpoint
    from .status import Status
    from .synthetic import SyntheticData, TokenCounts

    console = console or Console(highlight=False)
    verbose = getattr(args, "verbose", 0)
    device = "cpu"
    if args.transport == "cuda_ipc":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--transport cuda_ipc needs a CUDA GPU (torch sees none); use shm on this machine")
        device = "cuda:0"
    cfg_kw = dict(hidden_size=args.hidden, dtype=args.dtype, transport=args.transport, device=device,
                  cache_buffers=args.cache_buffers, pool_bytes=getattr(args, "pool_bytes", None),
                  encoder_endpoint=args.endpoint or f"tcp://127.0.0.1:{free_port()}")
    cfg = Config(**cfg_kw)
    counts = TokenCounts(args.requests, cfg.default_allocate_tokens, cfg.block_size, seed=args.seed)
    n = len(counts)
    max_tokens = counts.max_tokens
    dtype_name = str(cfg.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    # short lines (80 columns): what runs, then the pool
    print(f"embresume demo: {n:,} requests of {counts.min_tokens}-{max_tokens} tokens, hidden {cfg.hidden_size} "
          f"{dtype_name}", flush=True)
    print(f"pool: {cfg.total_pool_blocks} blocks of {cfg.block_size} tokens ({cfg.pool_nbytes / 2**20:.1f} MiB), "
          f"{cfg.default_allocate_tokens} tokens per request at first", flush=True)
    data_spec = (cfg.hidden_size, args.dtype, max_tokens, args.seed)
    data = SyntheticData(*data_spec)
    enc_spec = data_spec + ((device,) if device != "cpu" else ())
    lat: list[float] = []
    lat_seen = 0
    rng = random.Random(args.seed)
    verified = failed = mismatched = 0
    verify_s = 0.0
    chunks = 0
    nbytes = 0
    reasons: collections.Counter = collections.Counter()
    quiet = None if verbose else _QuietLibrary()
    handlers = logging.getLogger().handlers
    # the pool first (a pool that does not fit fails here, before the encoder starts)
    deferred = "connect" in inspect.signature(LanguageEndpoint).parameters
    lang = LanguageEndpoint(cfg, connect=False) if deferred else None
    died = None
    try:
        level = logging.getLogger("embresume").getEffectiveLevel()
        with EncoderProcess(cfg, data_spec=enc_spec, log_level=level if verbose else None) as enc:
            if lang is None:
                lang = LanguageEndpoint(cfg)
            else:
                lang.connect()
            print(f"encoder pid {enc.proc.pid} at {enc.address}; language rank connected via {lang.transport_name}",
                  flush=True)
            if quiet is not None:
                for h in handlers:
                    h.addFilter(quiet)
            todo = iter(enumerate(counts))
            more = True
            inflight: dict[int, tuple[int, float]] = {}
            done_n = 0
            t0 = time.perf_counter()
            last_done = next_check = time.monotonic()
            tty = console.is_terminal
            bar = (Progress(TextColumn("transferring"), BarColumn(bar_width=16),
                            TextColumn("{task.completed:,}/{task.total:,}"), TextColumn("{task.fields[rate]}"),
                            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
                   if tty else contextlib.nullcontext())
            ticker = None if tty else _Ticker(n)
            with bar:
                task = bar.add_task("transferring", total=n, rate="") if tty else None
                last_rate_at = time.monotonic()
                while more or inflight:
                    now = time.monotonic()
                    if now >= next_check:
                        next_check = now + 0.1
                        if not enc.proc.is_alive():
                            died = enc.proc.exitcode
                            break
                        if now - last_done > STALL_SECONDS:
                            break
                    while more and len(inflight) < args.inflight:
                        item = next(todo, None)
                        if item is None:
                            more = False
                            break
                        room, tokens = item
                        enc.send(room, tokens)
                        inflight[room] = (tokens, time.perf_counter())
                        lang.request(room)
                    done = [r for r in inflight if lang.poll(r).terminal]
                    if not done:
                        time.sleep(0.0002)
                        continue
                    last_done = time.monotonic()
                    encoder_lost = False
                    for room in done:
                        tokens, ts = inflight.pop(room)
                        st = lang.poll(room)
                        if st is Status.Success:
                            x = time.perf_counter() - ts
                            lat_seen += 1
                            if len(lat) < LATENCY_SAMPLES:
                                lat.append(x)
                            else:  # reservoir: a uniform sample of every request's latency
                                j = rng.randrange(lat_seen)
                                if j < LATENCY_SAMPLES:
                                    lat[j] = x
                            res = lang.result(room)
                            chunks += res.chunks
                            nbytes += res.embeddings.numel() * res.embeddings.element_size()
                            tv = time.perf_counter()
                            good = res.total_tokens == tokens and data.verify(room, res)
                            verify_s += time.perf_counter() - tv
                            res.release()  # recycle the merged buffers for the next request
                            if good:
                                verified += 1
                            else:
                                mismatched += 1
                        else:
                            failed += 1
                            reason = lang.failure_reason(room)
                            reasons[reason] += 1
                            encoder_lost |= "encoder" in str(reason)
                        done_n += 1
                    if encoder_lost:
                        enc.proc.join(2.0)   # a killed encoder: its exit status shows up at once
                        if not enc.proc.is_alive():
                            died = enc.proc.exitcode
                            break
                    if tty:
                        if last_done - last_rate_at >= 0.5:
                            last_rate_at = last_done
                            el = time.perf_counter() - t0
                            bar.update(task, completed=done_n, rate=f"{done_n / el:,.0f}/s" if el > 0 else "")
                        else:
                            bar.update(task, completed=done_n)
                    else:
                        ticker(done_n)
            if died is not None or not enc.proc.is_alive():
                code = died if died is not None else enc.proc.exitcode
                raise EncoderDied(f"the encoder process (pid {enc.proc.pid}) {_exit_text(code)}; "
                                  f"{done_n:,} of {n:,} requests were done")
            elapsed = max(1e-9, time.perf_counter() - t0 - verify_s)  # verification is not transfer time
            lost = (n - done_n)
            leftover = lang.allocator.used_blocks
            lang.close()  # before the encoder goes: a clean goodbye, not "encoder lost"
    finally:
        try:
            if lang is not None:
                lang.close()
        finally:
            if quiet is not None:
                for h in handlers:
                    h.removeFilter(quiet)
    resumes = chunks - verified - mismatched
    lat_ms = sorted(x * 1e3 for x in lat) or [float("nan")]
    p50 = statistics.median(lat_ms)
    p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
    table = Table(title="summary", show_header=False)
    for k, v in [("requests", n), ("resumes", resumes), ("chunks", chunks),
                 ("bytes", f"{nbytes / 2**20:.1f} MiB"), ("throughput", f"{nbytes / elapsed / 1e9:.2f} GB/s"),
                 ("latency p50", f"{p50:.2f} ms"), ("latency p99", f"{p99:.2f} ms"),
                 ("failed", failed), ("blocks still allocated", leftover)]:
        table.add_row(k, str(v))
    console.print(table)
    if verbose:
        try:
            from .metrics import render_text
            text = render_text()
            if text:
                print("metrics (this process):\n" + text)
        except Exception:  # pragma: no cover - metrics are optional
            pass
    ok = verified == n and not failed and not mismatched and not lost and leftover == 0
    for reason, k in reasons.most_common(5):
        print(f"failed x{k}: {' '.join(str(reason).split())}")
    if lost:
        print(f"{lost} requests did not finish (no request finished for {STALL_SECONDS:.0f} s)")
    if quiet is not None and quiet.held and not ok:
        print(f"({quiet.held} library log lines held back; run with -v to see them)")
    # the last line: plain print, never wrapped (rich would fold it at the console width)
    print(f"requests {n}, resumes {resumes}, {nbytes / 2**20:.1f} MiB, {nbytes / elapsed / 1e9:.2f} GB/s, "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, verified {verified}/{n}: {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1
