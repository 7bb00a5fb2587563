"""``embresume demo``: an encoder process and a language process on this host.

Sends N requests whose token counts follow a realistic image/video mix plus
the edge cases, verifies every merged result bit for bit and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from .config import Config
from .harness import EncoderProcess, free_port
from .language import LanguageEndpoint
from .status import Status
from .synthetic import SyntheticData, image_token_counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", "-n", type=int, default=200, help="number of requests (default 200)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--transport", default="shm", choices=["auto", "shm", "mooncake"],
                   help="data path (default shm: the same-host CPU path)")
    p.add_argument("--inflight", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--cache-buffers", type=int, default=4,
                   help="receive pool size in default allocations (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint", default=None, help="encoder ZeroMQ endpoint (default: a free loopback port)")


def run(args: argparse.Namespace, console: Optional[Console] = None) -> int:
    console = console or Console()
    cfg_kw = dict(hidden_size=args.hidden, dtype=args.dtype, transport=args.transport,
                  cache_buffers=args.cache_buffers,
                  encoder_endpoint=args.endpoint or f"tcp://127.0.0.1:{free_port()}")
    cfg = Config(**cfg_kw)
    counts = image_token_counts(args.requests, cfg.default_allocate_tokens, cfg.block_size, seed=args.seed)
    max_tokens = max(counts)
    console.print(f"[bold]embresume demo[/]: {len(counts)} requests, {min(counts)}-{max_tokens} tokens, "
                  f"hidden {cfg.hidden_size} {str(cfg.dtype).removeprefix('torch.')}, block {cfg.block_size}, "
                  f"default allocation {cfg.default_allocate_tokens} tokens, pool {cfg.total_pool_blocks} blocks")
    data_spec = (cfg.hidden_size, args.dtype, max_tokens, args.seed)
    data = SyntheticData(*data_spec)
    lat: list[float] = []
    verified = failed = mismatched = 0
    verify_s = 0.0
    chunks = 0
    nbytes = 0
    reasons = collections.Counter()
    with EncoderProcess(cfg, data_spec=data_spec) as enc, LanguageEndpoint(cfg) as lang:
        console.print(f"encoder pid {enc.proc.pid} at {enc.address}; language rank connected via "
                      f"[bold]{lang.transport_name}[/]")
        todo = collections.deque(enumerate(counts))
        inflight: dict[int, tuple[int, float]] = {}
        t0 = time.perf_counter()
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
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
        elapsed = time.perf_counter() - t0 - verify_s  # verification is not transfer time
        lost = len(todo) + len(inflight)
        leftover = lang.allocator.used_blocks
    n = len(counts)
    lat_ms = sorted(x * 1e3 for x in lat) or [float("nan")]
    p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
    table = Table(title="summary", show_header=False)
    for k, v in [("requests", n), ("resumes", chunks - verified - mismatched), ("chunks", chunks),
                 ("bytes", f"{nbytes / 2**20:.1f} MiB"), ("throughput", f"{nbytes / elapsed / 1e9:.2f} GB/s"),
                 ("latency p50", f"{statistics.median(lat_ms):.2f} ms"), ("latency p99", f"{p99:.2f} ms"),
                 ("failed", failed), ("blocks still allocated", leftover)]:
        table.add_row(k, str(v))
    console.print(table)
    ok = verified == n and not failed and not mismatched and not lost and leftover == 0
    console.print(f"requests {n}, resumes {chunks - verified - mismatched}, {nbytes / 2**20:.1f} MiB, "
                  f"{nbytes / elapsed / 1e9:.2f} GB/s, p50 {statistics.median(lat_ms):.2f} ms, "
                  f"p99 {p99:.2f} ms, verified {verified}/{n}")
    if reasons:
        for reason, k in reasons.most_common(5):
            console.print(f"[red]failed x{k}[/]: {reason}")
    if lost:
        console.print(f"[red]{lost} requests did not finish in time[/]")
    console.print("[bold green]OK[/]" if ok else "[bold red]MISMATCH[/]")
    return 0 if ok else 1
