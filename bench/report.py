"""Ratios, goals and the terminal report (rich) of a benchmark run.

Goals are reported as PASS / MISS / N/A lines; nothing here ever asserts.
"""

from __future__ import annotations

import math
from typing import Optional

from rich import box
from rich.console import Console
from rich.table import Table

GOAL_TOKENS, GOAL_HIDDEN = 8192, 4096
ZMQ_PATHS = ("zmq-ipc", "zmq-tcp")
MOONCAKE_PATHS = ("mooncake", "mooncake-raw")

PATH_ORDER = ["memcpy", "shm", "shm-zc", "cuda_ipc", "mooncake", "mooncake-raw", "mp-queue", "zmq-ipc", "zmq-tcp"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _index(samples: list[dict]) -> dict:
    return {(s["path"], s["tokens"], s["hidden"]): s for s in samples}


def best_zmq(idx: dict, tokens: int, hidden: int) -> Optional[dict]:
    cands = [idx[(p, tokens, hidden)] for p in ZMQ_PATHS if (p, tokens, hidden) in idx]
    cands = [c for c in cands if _finite(c.get("gbps_p50"))]
    return max(cands, key=lambda c: c["gbps_p50"]) if cands else None


def add_ratios(samples: list[dict]) -> None:
    """``ratio_memcpy`` and ``ratio_zmq`` (to the faster pickle-over-ZeroMQ
    variant) of every sample, from p50 throughput at the same size."""
    idx = _index(samples)
    for s in samples:
        m = idx.get(("memcpy", s["tokens"], s["hidden"]))
        z = best_zmq(idx, s["tokens"], s["hidden"])
        g = s.get("gbps_p50")
        s["ratio_memcpy"] = g / m["gbps_p50"] if m and _finite(g) and _finite(m.get("gbps_p50")) else None
        s["ratio_zmq"] = g / z["gbps_p50"] if z and _finite(g) else None
        s["ratio_zmq_against"] = z["path"] if z else None


def _goal(name: str, target: str, value, ok: Optional[bool], detail: str) -> dict:
    status = "N/A" if ok is None else ("PASS" if ok else "MISS")
    return {"name": name, "target": target, "value": value, "status": status, "detail": detail}


def evaluate_goals(data: dict) -> list[dict]:
    idx = _index(data.get("samples", []))
    T, H = GOAL_TOKENS, GOAL_HIDDEN
    at = f"{T} tokens x {H} hidden"
    shm = idx.get(("shm", T, H))
    out = []
    if shm is None or not _finite(shm.get("gbps_p50")):
        measured = sorted({(s["tokens"], s["hidden"]) for s in data.get("samples", []) if s["path"] == "shm"})
        why = (f"set at {T}x{H}; shm ran at other sizes here (--quick measures it)" if measured
               else "shm was not measured in this run")
        out.append(_goal("shm >= 45% of memcpy", ">= 0.45", None, None, why))
        out.append(_goal("shm >= 8x pickle-over-ZeroMQ", ">= 8", None, None, why))
        out.append(_goal("shm >= 2.5x Mooncake tcp", ">= 2.5", None, None, why))
    else:
        g = shm["gbps_p50"]
        m = idx.get(("memcpy", T, H))
        if m:
            r = g / m["gbps_p50"]
            out.append(_goal("shm >= 45% of memcpy", ">= 0.45", r, r >= 0.45,
                             f"shm {g:.2f} GB/s vs single-thread memcpy {m['gbps_p50']:.2f} GB/s at {at}"))
        else:
            out.append(_goal("shm >= 45% of memcpy", ">= 0.45", None, None, "memcpy not measured"))
        zc = idx.get(("shm-zc", T, H))
        if m and zc and _finite(zc.get("gbps_p50")):
            r = zc["gbps_p50"] / m["gbps_p50"]
            out.append(_goal("shm zero-copy receive >= 45% of memcpy", ">= 0.45", r, r >= 0.45,
                             f"shm-zc {zc['gbps_p50']:.2f} GB/s (Config(zero_copy=True): one copy, results are "
                             f"views of the pool) vs memcpy {m['gbps_p50']:.2f} GB/s at {at}"))
        z = best_zmq(idx, T, H)
        if z:
            r = g / z["gbps_p50"]
            out.append(_goal("shm >= 8x pickle-over-ZeroMQ", ">= 8", r, r >= 8,
                             f"shm {g:.2f} GB/s vs {z['path']} (the faster ZeroMQ variant) "
                             f"{z['gbps_p50']:.3f} GB/s at {at}"))
        else:
            out.append(_goal("shm >= 8x pickle-over-ZeroMQ", ">= 8", None, None, "ZeroMQ baselines not measured"))
        mk = [idx[(p, T, H)] for p in MOONCAKE_PATHS if (p, T, H) in idx and _finite(idx[(p, T, H)].get("gbps_p50"))]
        if mk:
            best = max(mk, key=lambda s: s["gbps_p50"])
            r = g / best["gbps_p50"]
            out.append(_goal("shm >= 2.5x Mooncake tcp", ">= 2.5", r, r >= 2.5,
                             f"shm {g:.2f} GB/s vs {best['path']} (fastest Mooncake figure) "
                             f"{best['gbps_p50']:.3f} GB/s at {at}"))
        else:
            reasons = "; ".join(f"{p}: {data['paths'].get(p, {}).get('reason', 'not run')}"
                                for p in MOONCAKE_PATHS)
            out.append(_goal("shm >= 2.5x Mooncake tcp", ">= 2.5", None, None, f"no Mooncake figure ({reasons})"))
    res = {e["resumes"]: e for e in data.get("resume", []) if e["path"] == "shm"}
    if 0 in res and 1 in res and _finite(res[0].get("p50_s")) and _finite(res[1].get("p50_s")):
        r = res[1]["p50_s"] / res[0]["p50_s"]
        out.append(_goal("one resume <= 1.25x no resume", "<= 1.25", r, r <= 1.25,
                         f"shm p50 {res[1]['p50_s'] * 1e3:.2f} ms with 1 resume vs {res[0]['p50_s'] * 1e3:.2f} ms "
                         f"without, {res[0]['tokens']} tokens x {res[0]['hidden']}"))
    else:
        out.append(_goal("one resume <= 1.25x no resume", "<= 1.25", None, None, "shm resume entries missing"))
    return out


# ------------------------------------------------------------------ rendering
def _ms(x) -> str:
    return f"{x * 1e3:.3f}" if _finite(x) else "-"


def _x(x) -> str:
    return f"{x:.2f}x" if _finite(x) else "-"


def _order(p: str) -> int:
    return PATH_ORDER.index(p) if p in PATH_ORDER else len(PATH_ORDER)


def _table(title: str, columns, first_left: int = 0) -> Table:
    """A compact table: no outer edge, one space between columns, long cells fold
    (never cut to '…'), so it fits 80 columns."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
              title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < first_left else "right", overflow="fold")
    return t


def _path_cell(path: str) -> str:
    return ("[bold]" + path + "[/]") if path in ("shm", "cuda_ipc", "mooncake") else path


def _ok(v) -> str:
    return "[green]yes[/]" if v else ("[red]NO[/]" if v is False else "?")


def render(data: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    m = data["machine"]
    console.print(f"[bold]embresume bench[/] profile={data['profile']}  {m.get('cpu_model')}  "
                  f"{m.get('usable_cores')} cores  {m.get('memory_gib')} GiB")
    console.print(f"python {m.get('python')}  torch {m.get('torch')}")

    samples = sorted(data.get("samples", []), key=lambda s: (s["hidden"], s["tokens"], _order(s["path"])))
    dtype = str(data.get("settings", {}).get("dtype", "")).removeprefix("torch.")
    for hidden in sorted({s["hidden"] for s in samples}):
        t = _table(f"hidden {hidden} {dtype}: latency, throughput (GB/s = 1e9 embedding bytes/s at p50), "
                   "ratios at p50", ("tokens", "MiB", "path", "p50 ms", "p99 ms", "GB/s", "x memcpy",
                                     "x pickle", "ok"), first_left=0)
        t.columns[2].justify = "left"
        last = None
        for s in (x for x in samples if x["hidden"] == hidden):
            if last is not None and s["tokens"] != last:
                t.add_section()
            last = s["tokens"]
            t.add_row(str(s["tokens"]), f"{s['bytes'] / 2**20:.1f}", _path_cell(s["path"]),
                      _ms(s.get("p50_s")), _ms(s.get("p99_s")),
                      f"{s['gbps_p50']:.3f}" if _finite(s.get("gbps_p50")) else "-",
                      _x(s.get("ratio_memcpy")), _x(s.get("ratio_zmq")), _ok(s.get("verified")))
        console.print(t)

    if data.get("resume"):
        t = _table("Resume overhead (same total tokens, forced resumes)",
                   ("path", "tokens", "hidden", "chunk", "resumes", "p50 ms", "p99 ms", "GB/s", "x none", "ok"),
                   first_left=1)
        for e in data["resume"]:
            t.add_row(e["path"], str(e["tokens"]), str(e["hidden"]), str(e["chunk_tokens"]),
                      f"{e['resumes']} ({','.join(map(str, e['measured_resumes']))})", _ms(e["p50_s"]),
                      _ms(e["p99_s"]), f"{e['gbps_p50']:.3f}" if _finite(e.get("gbps_p50")) else "-",
                      _x(e.get("ratio_to_no_resume")), _ok(e["verified"]))
        console.print(t)

    if data.get("concurrency"):
        t = _table("Concurrency (N requests in flight; latency from batch start to each result)",
                   ("path", "in flight", "tokens", "hidden", "p50 ms", "p99 ms", "total GB/s", "ok"), first_left=1)
        for e in data["concurrency"]:
            t.add_row(e["path"], str(e["in_flight"]), str(e["tokens"]), str(e["hidden"]), _ms(e["p50_s"]),
                      _ms(e["p99_s"]), f"{e['throughput_gbps']:.3f}" if _finite(e["throughput_gbps"]) else "-",
                      _ok(e["verified"]))
        console.print(t)

    if data.get("allocator"):
        t = _table("Allocator: allocate+free pairs per second (pool half full)",
                   ("pool blocks", "blocks/alloc", "pairs/s (median)", "us/pair"))
        for e in data["allocator"]:
            t.add_row(str(e["pool_blocks"]), str(e["blocks_per_allocation"]), f"{e['ops_per_s']:,.0f}",
                      f"{e['us_per_pair']:.2f}")
        console.print(t)

    for name, p in data.get("paths", {}).items():
        if p["status"] != "ran":
            why = p.get("reason") or p.get("error") or ""
            colour = "yellow" if p["status"] == "skipped" else "red"
            console.print(f"[{colour}]{p['status'].upper()}[/] {name}: {why.splitlines()[0] if why else ''}")
    for g in data.get("goals", []):
        colour = {"PASS": "green", "MISS": "red"}.get(g["status"], "yellow")
        val = f"{g['value']:.2f}" if _finite(g.get("value")) else "-"
        console.print(f"[{colour}]{g['status']}[/] {g['name']} (target {g['target']}, got {val}): {g['detail']}")
    for w in data.get("warnings", []):
        console.print(f"[yellow]WARNING[/] {w}")
