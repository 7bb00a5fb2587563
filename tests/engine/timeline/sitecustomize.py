"""Timeline probe for a vLLM engine with the connector (a measuring tool, not part of the package).

With ``EMBRESUME_PROBE=<file>`` set, every Python process started with this directory on
``PYTHONPATH`` (vLLM's client, its engine-core process and its workers) appends
``t_ns pid event detail`` lines (``time.monotonic_ns``: one clock for every process of the
host) for the landing consumer's hooks, the endpoints' message handlers on both sides of a
transfer, vLLM's engine steps and ``LLM.generate``.  Each
module is patched right after it is imported, so nothing is imported early.  Driven by
``run.py`` beside it."""
import os, sys, time, functools, importlib.abc, importlib.util

PATH = os.environ.get("EMBRESUME_PROBE")


def log(event, detail=""):
    line = f"{time.monotonic_ns()} {os.getpid()} {event} {detail}\n".encode()
    fd = os.open(PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def wrap(cls, name, describe=None, always=True):
    f = getattr(cls, name, None)
    if f is None:
        return

    @functools.wraps(f)
    def w(*a, **k):
        t = time.monotonic_ns()
        r = f(*a, **k)
        d = describe(a, k, r) if describe else ""
        if always or d:
            log(f"{cls.__name__}.{name}", f"{(time.monotonic_ns() - t) / 1e3:.0f}us {d}")
        return r
    setattr(cls, name, w)


def rid(a, k, r):
    req = a[1]
    return f"req={getattr(req, 'request_id', '?')} -> {r}"


def patch_consumer(m):
    S = m.LandingScheduler
    wrap(S, "ensure_cache_available", rid)
    wrap(S, "has_cache_item", lambda a, k, r: f"{a[1][:8]} -> {r}")
    wrap(S, "update_state_after_alloc", rid)
    wrap(S, "build_connector_meta", lambda a, k, r: repr(r)[:200], always=False)
    wrap(S, "_start", lambda a, k, r: "")
    wrap(S, "_landed", lambda a, k, r: a[1][:8])
    wrap(S, "update_connector_output", lambda a, k, r: "")
    wrap(m.LandingWorker, "start_load_caches", lambda a, k, r: "")


def msg_kind(a, k, r):
    return type(a[2]).__name__


def patch_encoder(m):
    # the producer's side of a transfer: the INIT read off the ring (the write runs inline
    # in the same call on a same-host ring), the write itself, the STATUS handed to the ring
    E = m.EncoderEndpoint
    wrap(E, "_on_message", msg_kind)
    wrap(E, "_write", lambda a, k, r: "")
    wrap(E, "_post", msg_kind)


def patch_language(m):
    L = m.LanguageEndpoint
    wrap(L, "request", lambda a, k, r: "")
    wrap(L, "_on_message", msg_kind)


def patch_ring(m):
    wrap(m.ShmRing, "try_send", lambda a, k, r: f"{len(a[1])}B -> {r}")


def patch_language_rooms(m):
    wrap(m.LanguageRooms, "request", lambda a, k, r: "")


def patch_tally(m):
    wrap(m.Tally, "record", lambda a, k, r: "")


def patch_core(m):
    E = m.EngineCore

    def step_desc(a, k, r):
        return f"executed={r[1]}"
    wrap(E, "step", step_desc)
    wrap(E, "add_request", lambda a, k, r: f"req={getattr(a[1], 'request_id', '?')}")


def patch_llm(m):
    wrap(m.LLM, "generate", lambda a, k, r: f"n={len(r)}")


TARGETS = {
    "embresume.integrations._vllm_consumer": patch_consumer,
    "embresume.encoder": patch_encoder,
    "embresume.language": patch_language,
    "embresume.ipc.ring": patch_ring,
    "embresume.rooms.language": patch_language_rooms,
    "embresume.rooms": patch_tally,
    "vllm.v1.engine.core": patch_core,
    "vllm.entrypoints.llm": patch_llm,
}


class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        orig = spec.loader.exec_module

        def exec_module(module, orig=orig, name=name):
            orig(module)
            try:
                TARGETS[name](module)
                log("patched", name)
            except Exception as e:
                log("patch-failed", f"{name} {type(e).__name__}: {e}")
        spec.loader.exec_module = exec_module
        return spec


if PATH:
    sys.meta_path.insert(0, Finder())
