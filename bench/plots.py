"""PNG plots of a benchmark run (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os

from .report import _order


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def throughput(data: dict, path: str) -> str:
    plt = _plt()
    samples = data.get("samples", [])
    hiddens = sorted({s["hidden"] for s in samples}) or [0]
    fig, axes = plt.subplots(1, len(hiddens), figsize=(6 * len(hiddens), 4.5), squeeze=False)
    for ax, h in zip(axes[0], hiddens):
        paths = sorted({s["path"] for s in samples if s["hidden"] == h}, key=_order)
        for p in paths:
            pts = sorted((s["bytes"] / 2**20, s["gbps_p50"]) for s in samples
                         if s["hidden"] == h and s["path"] == p and _ok(s.get("gbps_p50")))
            if not pts:
                continue
            style = dict(linewidth=2.5, marker="o") if p in ("shm", "cuda_ipc", "mooncake") else \
                dict(linewidth=1.2, marker=".", linestyle="--" if p == "memcpy" else "-")
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=p, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("embedding MiB per request")
        ax.set_ylabel("GB/s (p50)")
        ax.set_title(f"hidden {h}, {samples[0]['dtype'] if samples else ''}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Throughput against size per path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resume(data: dict, path: str) -> str:
    plt = _plt()
    entries = data.get("resume", [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    paths = sorted({e["path"] for e in entries}, key=_order)
    width = 0.8 / max(1, len(paths))
    ks = sorted({e["resumes"] for e in entries})
    for i, p in enumerate(paths):
        es = {e["resumes"]: e for e in entries if e["path"] == p}
        xs = [j + i * width for j, k in enumerate(ks) if k in es]
        ys = [es[k]["p50_s"] * 1e3 for k in ks if k in es]
        bars = ax.bar(xs, ys, width, label=p)
        for b, k in zip(bars, [k for k in ks if k in es]):
            r = es[k].get("ratio_to_no_resume")
            if _ok(r):
                ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(ks))])
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("resumes (same total tokens)")
    ax.set_ylabel("p50 latency, ms")
    if entries:
        ax.set_title(f"Resume overhead: {entries[0]['tokens']} tokens x {entries[0]['hidden']}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def concurrency(data: dict, path: str) -> str:
    plt = _plt()
    entries = data.get("concurrency", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in sorted({e["path"] for e in entries}, key=_order):
        es = sorted((e for e in entries if e["path"] == p), key=lambda e: e["in_flight"])
        n = [e["in_flight"] for e in es]
        a1.plot(n, [e["throughput_gbps"] for e in es], marker="o", label=p)
        a2.plot(n, [e["p50_s"] * 1e3 for e in es], marker="o", label=f"{p} p50")
        a2.plot(n, [e["p99_s"] * 1e3 for e in es], marker="x", linestyle="--", label=f"{p} p99")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("requests in flight")
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    a1.set_ylabel("aggregate GB/s")
    a2.set_ylabel("latency from batch start, ms")
    fig.suptitle("Concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def allocator(data: dict, path: str) -> str:
    plt = _plt()
    entries = data.get("allocator", [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([e["pool_blocks"] for e in entries], [e["ops_per_s"] for e in entries], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("pool blocks")
    ax.set_ylabel("allocate+free pairs per second")
    ax.set_title("Allocator throughput against pool size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(data: dict, out_dir: str) -> list[str]:
    files = []
    for name, fn in (("throughput", throughput), ("resume", resume), ("concurrency", concurrency),
                     ("allocator", allocator)):
        files.append(fn(data, os.path.join(out_dir, f"{name}.png")))
    return files
