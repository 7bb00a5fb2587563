"""``embresume demo``: an encoder process and a language process on this host.

Sends N requests whose token counts follow a realistic image/video mix plus
the edge cases, verifies every merged result bit for bit and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import statistics
import sys
import time
import traceback

from .cli import dtype_arg, int_arg, local_endpoint, positive_int, size_arg

DESCRIPTION = """\
Starts an encoder process and a language process on this host, sends N
requests whose token counts follow an image/video mix (28x28 patches) plus the
edge cases (1 token, one more than the default allocation, several times it),
verifies every merged result bit for bit and prints requests, resumes, bytes,
GB/s, p50/p99 latency and "verified N/N".  Exits 1 on any mismatch."""


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
    from .errors import ConfigError, EmbResumeError, InvalidArgument
    verbose = getattr(args, "verbose", 0)
    try:
        return _run(args, console)
    except (ConfigError, InvalidArgument) as e:
        if verbose:
            traceback.print_exc()
        hint = ""
        if "shared memory" in str(e):
            hint = " (demo: use --cache-buffers 1, --pool-bytes 32M or --hidden 512)"
        return _error(f"{e}{hint}", 2)
    except EmbResumeError as e:
        if verbose:
            traceback.print_exc()
        return _error(f"{type(e).__name__}: {_first_line(e)}")
    except (RuntimeError, TimeoutError, OSError) as e:
        if verbose:
            traceback.print_exc()
        return _error(f"{_first_line(e)}" + ("" if verbose else " (run with -v for details)"))


def _run(args: argparse.Namespace, console=None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from .config import Config
    from .errors import ConfigError
    from .harness import EncoderProcess, free_port
    from .language import LanguageEndpoint
    from .status import Status
    from .synthetic import SyntheticData, image_token_counts

    console = console or Console(highlight=False)
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
    counts = image_token_counts(args.requests, cfg.default_allocate_tokens, cfg.block_size, seed=args.seed)
    max_tokens = max(counts)
    print(f"embresume demo: {len(counts)} requests, {min(counts)}-{max_tokens} tokens, hidden {cfg.hidden_size} "
          f"{str(cfg.dtype).removeprefix('torch.')}, block {cfg.block_size}, default allocation "
          f"{cfg.default_allocate_tokens} tokens, pool {cfg.total_pool_blocks} blocks "
          f"({cfg.pool_nbytes / 2**20:.1f} MiB)", flush=True)
    data_spec = (cfg.hidden_size, args.dtype, max_tokens, args.seed)
    data = SyntheticData(*data_spec)
    enc_spec = data_spec + ((device,) if device != "cpu" else ())
    lat: list[float] = []
    verified = failed = mismatched = 0
    verify_s = 0.0
    chunks = 0
    nbytes = 0
    reasons: collections.Counter = collections.Counter()
    # the pool first (a /dev/shm that is too small fails here, before the encoder starts)
    deferred = "connect" in inspect.signature(LanguageEndpoint).parameters
    lang = LanguageEndpoint(cfg, connect=False) if deferred else None
    try:
        with EncoderProcess(cfg, data_spec=enc_spec) as enc:
            if lang is None:
                lang = LanguageEndpoint(cfg)
            else:
                lang.connect()
            print(f"encoder pid {enc.proc.pid} at {enc.address}; language rank connected via {lang.transport_name}",
                  flush=True)
            todo = collections.deque(enumerate(counts))
            inflight: dict[int, tuple[int, float]] = {}
            t0 = time.perf_counter()
            with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=console.is_terminal) as bar:
                task = bar.add_task("transferring", total=len(counts))
                deadline = time.monotonic() + max(60.0, 0.5 * len(counts))
                while (todo or inflight) and time.monotonic() < deadline:
                    while todo and len(inflight) < args.inflight:
                        room, tokens = todo.popleft()
                        enc.send(room, tokens)
                        inflight[room] = (tokens, time.perf_counter())
                        lang.request(room)
                    done = [r for r in inflight if lang.poll(r).terminal]
                    if not done:
                        time.sleep(0.0002)
                        continue
                    for room in done:
                        tokens, ts = inflight.pop(room)
                        st = lang.poll(room)
                        if st is Status.Success:
                            lat.append(time.perf_counter() - ts)
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
                            reasons[lang.failure_reason(room)] += 1
                        bar.advance(task)
            elapsed = max(1e-9, time.perf_counter() - t0 - verify_s)  # verification is not transfer time
            lost = len(todo) + len(inflight)
            leftover = lang.allocator.used_blocks
            lang.close()  # before the encoder goes: a clean goodbye, not "encoder lost"
    finally:
        if lang is not None:
            lang.close()
    n = len(counts)
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
    if getattr(args, "verbose", 0):
        try:
            from .metrics import REGISTRY
            text = REGISTRY.render_text()
            if text:
                print("metrics (this process):\n" + text)
        except Exception:  # pragma: no cover - metrics are optional
            pass
    ok = verified == n and not failed and not mismatched and not lost and leftover == 0
    for reason, k in reasons.most_common(5):
        print(f"failed x{k}: {reason}")
    if lost:
        print(f"{lost} requests did not finish in time")
    # the last line: plain print, never wrapped (rich would fold it at the console width)
    print(f"requests {n}, resumes {resumes}, {nbytes / 2**20:.1f} MiB, {nbytes / elapsed / 1e9:.2f} GB/s, "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, verified {verified}/{n}: {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1
