"""The endpoints' metrics, recorded with ``prometheus_client``.

Each endpoint records its events once, into its :class:`EndpointStats`
(``endpoint.stats``, a Counter of that endpoint's own totals), whose methods
also update ``prometheus_client`` metrics (Counter, Gauge, Histogram, named
``embresume_*``, labelled by ``role``) in the same call, so the two never
drift apart::

    from embresume import metrics
    s = metrics.EndpointStats(role="language")
    s.request_started()                 # a request is issued
    s.chunk(tokens, row_bytes)          # a chunk landed (language) / was written (encoder)
    s.request_succeeded(resumes=1, latency_s=0.004, wasted_tokens=384)
    s.request_failed("peer_dead")       # cause: a short fixed word, never free text
    s.pool(used_blocks, total_blocks)   # after an allocation or a free
    s["resumes"] += 1                   # a count of this endpoint only

    print(metrics.render_text())        # a short human summary
    server, port = metrics.export_prometheus(port=9400)   # http://127.0.0.1:9400/metrics

Registry: by default the metrics go to ``prometheus_client.REGISTRY``, the
process-wide registry every ``prometheus_client`` user shares.  A process
that already serves ``/metrics`` with ``prometheus_client`` (an inference
server, an application's own exporter) then shows the ``embresume_*`` series
next to its own with no wiring, and :func:`export_prometheus` serves them
(with the client's process and GC collectors) where nothing does.  A private
module-level registry would hide them from such a server until its owner
found and registered it.  Pass a ``prometheus_client.CollectorRegistry`` to
:class:`EndpointStats` to keep an endpoint's series apart (tests do).  The
nine metrics are created once per registry (``prometheus_client`` refuses a
name registered twice) and shared by every :class:`EndpointStats` on it;
each :class:`EndpointStats` binds its ``role`` children once, so an event is
a few ``prometheus_client`` increments (about 0.3 us each, 0.8 us for a
histogram observation).

Without ``prometheus_client`` (the ``metrics`` extra:
``pip install 'embresume[metrics]'``) metrics are off: :class:`EndpointStats`
still counts its own keys, :func:`render_text` returns ``""``,
:func:`export_prometheus` raises ``RuntimeError``, and the first
:class:`EndpointStats` of the process logs one INFO line saying so.  INFO,
not WARNING: leaving out an optional extra is a deployment choice, not a
fault, and the endpoints log their other configuration facts (pool size,
transport chosen) at INFO too.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import weakref
from typing import TYPE_CHECKING, Optional

try:
    import prometheus_client as _prom
except ImportError:  # the 'metrics' extra is not installed: metrics are off
    _prom = None

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- names
#: metric names of the endpoints (exposed with the ``embresume_`` namespace;
#: ``prometheus_client`` exposes a counter ``x_total`` also as ``x_created``)
REQUESTS_TOTAL = "requests_total"
BYTES_TOTAL = "bytes_total"
CHUNKS_TOTAL = "chunks_total"
RESUMES_PER_REQUEST = "resumes_per_request"
WASTED_TOKENS = "wasted_tokens"
POOL_USED_BLOCKS = "pool_used_blocks"
POOL_TOTAL_BLOCKS = "pool_total_blocks"
FAILURES_TOTAL = "failures_total"
LATENCY_SECONDS = "latency_seconds"

NAMESPACE = "embresume"
INSTALL_HINT = "pip install 'embresume[metrics]'"

#: histogram buckets (upper bounds; +Inf is implicit)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
RESUME_BUCKETS = (0, 1, 2, 3, 4, 5, 10, 20, 50, 100)
WASTED_TOKEN_BUCKETS = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)

#: name -> (kind, help, label names, buckets)
_SPECS = {
    REQUESTS_TOTAL: ("counter", "requests started", ("role",), None),
    BYTES_TOTAL: ("counter", "embedding, fill_ids and mrope bytes moved", ("role",), None),
    CHUNKS_TOTAL: ("counter", "chunks moved (one per init or resume)", ("role",), None),
    RESUMES_PER_REQUEST: ("histogram", "resumes a successful request needed", ("role",), RESUME_BUCKETS),
    WASTED_TOKENS: ("histogram", "tokens allocated but not filled, per successful request", ("role",),
                    WASTED_TOKEN_BUCKETS),
    POOL_USED_BLOCKS: ("gauge", "blocks of the receive pool in use", ("role",), None),
    POOL_TOTAL_BLOCKS: ("gauge", "blocks of the receive pool", ("role",), None),
    FAILURES_TOTAL: ("counter", "requests that ended Failed, by cause", ("role", "cause"), None),
    LATENCY_SECONDS: ("histogram", "request start to Success, seconds", ("role",), LATENCY_BUCKETS),
}

#: registry -> {name: prometheus_client metric}, created once per registry
_metric_sets: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_off_logged = False


def enabled() -> bool:
    """Whether metrics are recorded (``prometheus_client`` is importable)."""
    return _prom is not None


def _default_registry():
    return _prom.REGISTRY


def metrics_for(registry: Optional["CollectorRegistry"] = None) -> Optional[dict]:
    """The nine ``prometheus_client`` metrics (``{name: metric}``) of ``registry``
    (default ``prometheus_client.REGISTRY``), created and registered there on
    the first call and the same objects on every later one; ``None`` when
    metrics are off."""
    if _prom is None:
        return None
    r = registry if registry is not None else _default_registry()
    with _lock:
        ms = _metric_sets.get(r)
        if ms is None:
            kinds = {"counter": _prom.Counter, "gauge": _prom.Gauge, "histogram": _prom.Histogram}
            ms = {}
            for name, (kind, help_, labels, buckets) in _SPECS.items():
                kw = {"buckets": buckets} if buckets is not None else {}
                ms[name] = kinds[kind](name, help_, labels, namespace=NAMESPACE, registry=r, **kw)
            _metric_sets[r] = ms
        return ms


def _log_metrics_off() -> None:
    global _off_logged
    with _lock:
        if _off_logged:
            return
        _off_logged = True
    log.info("embresume metrics are off (prometheus_client is not installed); to turn them on: %s",
             INSTALL_HINT)


class EndpointStats(collections.Counter):
    """An endpoint's counters: the one place its events are recorded.

    ``endpoint.stats["resumes"]`` reads like a plain :class:`collections.Counter`
    (``dict(endpoint.stats)`` is the endpoint's own totals).  The events that
    have a Prometheus series (requests, chunks and bytes, successes with
    their latency, resumes and waste, failures by cause, pool use) are recorded
    through the methods below, which update this counter *and* the
    ``prometheus_client`` metrics of ``registry`` (default
    ``prometheus_client.REGISTRY``) in the same call: there is no second
    counter to keep in step.  Any other count is ``stats[name] += n``
    (endpoint-only).  ``stats.metrics`` is the registry's ``{name: metric}``
    (see :func:`metrics_for`), ``None`` when metrics are off.
    """

    def __init__(self, role: str = "language", registry: Optional["CollectorRegistry"] = None):
        super().__init__()
        self.role = role
        self.metrics = ms = metrics_for(registry)
        self._on = ms is not None
        if not self._on:
            _log_metrics_off()
            return
        # children bound once: an event is the increments only
        self._requests = ms[REQUESTS_TOTAL].labels(role=role)
        self._bytes = ms[BYTES_TOTAL].labels(role=role)
        self._chunks = ms[CHUNKS_TOTAL].labels(role=role)
        self._resumes = ms[RESUMES_PER_REQUEST].labels(role=role)
        self._wasted = ms[WASTED_TOKENS].labels(role=role)
        self._pool_used = ms[POOL_USED_BLOCKS].labels(role=role)
        self._pool_total = ms[POOL_TOTAL_BLOCKS].labels(role=role)
        self._latency = ms[LATENCY_SECONDS].labels(role=role)
        self._failures = ms[FAILURES_TOTAL]
        self._failure_kids: dict = {}

    def __reduce__(self):           # pickles / copies as the plain counter it reads as
        return collections.Counter, (dict(self),)

    def request_started(self, hinted: bool = False) -> None:
        self["requests"] += 1
        if hinted:
            self["hinted"] += 1
        if self._on:
            self._requests.inc()

    def chunk(self, tokens: int, row_bytes: int) -> None:
        """A chunk of ``tokens`` embedding rows of ``row_bytes`` landed / was written
        (the Prometheus bytes also count fill_ids and mrope: 16 bytes a token)."""
        self["chunks"] += 1
        self["bytes"] += tokens * row_bytes
        if self._on:
            self._chunks.inc()
            self._bytes.inc(tokens * (row_bytes + 16))

    def request_succeeded(self, *, resumes: int, latency_s: float, wasted_tokens: int = 0) -> None:
        self["success"] += 1
        self["wasted_tokens"] += wasted_tokens
        if self._on:
            self._resumes.observe(resumes)
            self._latency.observe(latency_s)
            self._wasted.observe(wasted_tokens)

    def request_failed(self, cause: str) -> None:
        self["failed"] += 1
        if self._on:
            kid = self._failure_kids.get(cause)
            if kid is None:
                kid = self._failure_kids.setdefault(cause, self._failures.labels(role=self.role, cause=cause))
            kid.inc()

    def pool(self, used_blocks: int, total_blocks: Optional[int] = None) -> None:
        if self._on:
            self._pool_used.set(used_blocks)
            if total_blocks is not None:
                self._pool_total.set(total_blocks)


# ---------------------------------------------------------------- reading
def render_text(registry: Optional["CollectorRegistry"] = None) -> str:
    """A short human summary of the ``embresume_*`` metrics of ``registry``
    (default ``prometheus_client.REGISTRY``), one line per series; a
    histogram shows its count, mean and the buckets its p50 and p99 fall in.
    ``""`` when nothing was recorded there or metrics are off."""
    if _prom is None:
        return ""
    r = registry if registry is not None else _default_registry()
    with _lock:
        ms = _metric_sets.get(r)
    if ms is None:
        return ""
    lines = []
    for family in sorted((f for m in ms.values() for f in m.collect()), key=lambda f: f.name):
        if family.type == "histogram":
            series: dict = {}
            for s in family.samples:
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                h = series.setdefault(key, {"buckets": []})
                if s.name.endswith("_bucket"):
                    h["buckets"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    h["count"] = s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
            for key, h in series.items():
                name = _series_name(family.name, key)
                n = int(h.get("count", 0))
                if not n:
                    lines.append(f"{name}: no observations")
                    continue
                lines.append(f"{name}: n={n} mean={_num(h['sum'] / n, family.name)} "
                             f"p50{_bucket_of(h['buckets'], n, 0.5, family.name)} "
                             f"p99{_bucket_of(h['buckets'], n, 0.99, family.name)}")
        else:
            value_name = family.name + "_total" if family.type == "counter" else family.name
            for s in family.samples:
                if s.name == value_name:
                    key = tuple(sorted(s.labels.items()))
                    lines.append(f"{_series_name(value_name, key)}: {_num(s.value, value_name)}")
    return "\n".join(lines)


def _series_name(name: str, labels: tuple) -> str:
    return name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")


def _bucket_of(buckets: list, n: int, q: float, name: str) -> str:
    """``<=bound`` of the first bucket holding the ``q`` quantile (``>bound`` past the last)."""
    prev = 0.0
    for le, acc in buckets:
        if acc >= q * n:
            return f">{_num(prev, name)}" if math.isinf(le) else f"<={_num(le, name)}"
        prev = le
    return "?"


def _num(x, name: str) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if name.endswith("_seconds"):
        return f"{x * 1e3:.3f} ms"
    if name.endswith(("_bytes", "_bytes_total")):
        return f"{x / 2**20:.1f} MiB" if x >= 2**20 else f"{int(x)} B"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.2f}"
    return str(int(x))


# ---------------------------------------------------------------- Prometheus
def export_prometheus(registry: Optional["CollectorRegistry"] = None, port: int = 0, addr: str = "127.0.0.1"):
    """Serve ``registry`` (default ``prometheus_client.REGISTRY``) at
    ``http://addr:port/metrics`` with ``prometheus_client.start_http_server``
    (a daemon thread).

    Returns ``(server, port)`` (the real port when ``port=0``); stop with
    ``server.shutdown(); server.server_close()``.  Needs ``prometheus_client``
    (``pip install 'embresume[metrics]'``).  Binds to loopback by default.
    """
    if _prom is None:
        raise RuntimeError(f"export_prometheus needs prometheus_client: {INSTALL_HINT}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    r = registry if registry is not None else _default_registry()
    server, _thread = _prom.start_http_server(port, addr=addr, registry=r)
    return server, server.server_port
