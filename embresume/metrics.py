"""A small, dependency-free metrics registry.

Counters, gauges and histograms (fixed buckets), optionally labelled.  One
call per event costs a few hundred nanoseconds: a dict look-up for the label
values (skipped with a bound child, see :meth:`Metric.labels`), one
``threading.Lock`` and an addition.  Reading is :meth:`Registry.snapshot`
(a plain dict), :meth:`Registry.render_text` (a short human summary) or
:func:`export_prometheus` (an HTTP endpoint for Prometheus, needs
``prometheus_client``).

Each endpoint records its events once, into its :class:`EndpointStats`
(``endpoint.stats``, a Counter of that endpoint's own totals), whose methods
also update the process-wide :data:`REGISTRY` through :class:`StandardMetrics`
in the same call, so the two never drift apart::

    from embresume import metrics
    s = metrics.EndpointStats(role="language")
    s.request_started()                 # a request is issued
    s.chunk(tokens, row_bytes)          # a chunk landed (language) / was written (encoder)
    s.request_succeeded(resumes=1, latency_s=0.004, wasted_tokens=384)
    s.request_failed("peer_dead")       # cause: a short fixed word, never free text
    s.pool(used_blocks, total_blocks)   # after an allocation or a free
    s["resumes"] += 1                   # a count of this endpoint only

    metrics.REGISTRY.snapshot()["requests_total"]["values"]
    server, port = metrics.export_prometheus(metrics.REGISTRY, port=9400)
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
from typing import Iterable, Optional, Sequence

# ---------------------------------------------------------------- names
#: metric names of the endpoints (Prometheus adds the ``embresume_`` namespace)
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

#: default buckets (upper bounds; +Inf is implicit)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
RESUME_BUCKETS = (0, 1, 2, 3, 4, 5, 10, 20, 50, 100)
WASTED_TOKEN_BUCKETS = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)

_INF = float("inf")


class Metric:
    """Base of the three kinds.  ``labelnames`` fixes the label keys."""

    kind = "untyped"

    def __init__(self, name: str, help: str = "", labelnames: Sequence[str] = ()):
        if not name or not all(c.isalnum() or c == "_" for c in name) or name[0].isdigit():
            raise ValueError(f"bad metric name {name!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple, "Metric"] = {}
        self._labelvalues: tuple = ()
        self._init_value()

    def _init_value(self) -> None:
        raise NotImplementedError

    def _new_child(self, values: tuple) -> "Metric":
        child = object.__new__(type(self))
        child.name, child.help, child.labelnames = self.name, self.help, ()
        child._lock = threading.Lock()
        child._children = {}
        child._labelvalues = values
        child._copy_config(self)
        child._init_value()
        return child

    def _copy_config(self, parent: "Metric") -> None:
        pass

    def labels(self, *values, **kw) -> "Metric":
        """The child for these label values (create once, keep it: calls on it
        skip the look-up)."""
        if not self.labelnames:
            raise ValueError(f"metric {self.name} has no labels")
        if kw:
            if values:
                raise ValueError("give label values positionally or by name, not both")
            try:
                values = tuple(kw[n] for n in self.labelnames)
            except KeyError as e:
                raise ValueError(f"metric {self.name} needs labels {self.labelnames}, missing {e}") from None
            if len(kw) != len(self.labelnames):
                raise ValueError(f"metric {self.name} has labels {self.labelnames}, got {sorted(kw)}")
        values = tuple(str(v) for v in values)
        child = self._children.get(values)
        if child is not None:
            return child
        if len(values) != len(self.labelnames):
            raise ValueError(f"metric {self.name} has labels {self.labelnames}, got {len(values)} values")
        with self._lock:
            return self._children.setdefault(values, self._new_child(values))

    def _series(self) -> list[tuple[dict, object]]:
        """[(labels dict, value)] of every series of this metric."""
        if self.labelnames:
            with self._lock:
                kids = list(self._children.items())
            return [(dict(zip(self.labelnames, k)), c._value_snapshot()) for k, c in kids]
        return [({}, self._value_snapshot())]

    def _value_snapshot(self):
        raise NotImplementedError

    def _check_unlabelled(self) -> None:
        if self.labelnames:
            raise ValueError(f"metric {self.name} is labelled {self.labelnames}: use .labels(...)")


class Counter(Metric):
    """A monotonically increasing number."""

    kind = "counter"

    def _init_value(self) -> None:
        self._value = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        if self.labelnames:
            self._check_unlabelled()
        lock = self._lock
        lock.acquire()  # explicit acquire/release: measurably cheaper than ``with``
        try:
            self._value += amount
        finally:
            lock.release()

    def _value_snapshot(self):
        return self._value

    @property
    def value(self):
        self._check_unlabelled()
        return self._value


class Gauge(Metric):
    """A number that goes up and down (pool occupancy)."""

    kind = "gauge"

    def _init_value(self) -> None:
        self._value = 0

    def set(self, value: float) -> None:
        if self.labelnames:
            self._check_unlabelled()
        self._value = value  # one store: atomic under the GIL

    def inc(self, amount: float = 1) -> None:
        if self.labelnames:
            self._check_unlabelled()
        lock = self._lock
        lock.acquire()
        try:
            self._value += amount
        finally:
            lock.release()

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    def _value_snapshot(self):
        return self._value

    @property
    def value(self):
        self._check_unlabelled()
        return self._value


class Histogram(Metric):
    """Observations counted in fixed buckets (upper bounds, ``le``), plus count and sum."""

    kind = "histogram"

    def __init__(self, name: str, help: str = "", labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        b = sorted(float(x) for x in buckets)
        if not b or any(math.isnan(x) for x in b) or len(set(b)) != len(b):
            raise ValueError(f"histogram {name}: buckets must be distinct numbers, got {list(buckets)}")
        if b[-1] != _INF:
            b.append(_INF)
        self.buckets = tuple(b)
        super().__init__(name, help, labelnames)

    def _copy_config(self, parent: "Histogram") -> None:
        self.buckets = parent.buckets

    def _init_value(self) -> None:
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        if self.labelnames:
            self._check_unlabelled()
        i = bisect.bisect_left(self.buckets, value)
        lock = self._lock
        lock.acquire()
        try:
            self._counts[i] += 1
            self._sum += value
            self._count += 1
        finally:
            lock.release()

    def _value_snapshot(self) -> dict:
        with self._lock:
            counts, s, n = list(self._counts), self._sum, self._count
        cum, acc = {}, 0
        for le, c in zip(self.buckets, counts):
            acc += c
            cum[_le(le)] = acc
        return {"count": n, "sum": s, "buckets": cum}

    @property
    def value(self) -> dict:
        self._check_unlabelled()
        return self._value_snapshot()


def _le(x: float) -> str:
    if x == _INF:
        return "+Inf"
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


def quantile(hist: dict, q: float) -> float:
    """Approximate ``q`` quantile of a histogram snapshot (``{"count", "buckets"}``),
    interpolated linearly inside the bucket, as Prometheus' histogram_quantile."""
    n = hist.get("count", 0)
    if not n:
        return float("nan")
    rank = q * n
    lo, prev = 0.0, 0
    for le, acc in hist["buckets"].items():
        hi = _INF if le == "+Inf" else float(le)
        if acc >= rank:
            if hi == _INF:
                return lo
            inside = acc - prev
            return lo + (hi - lo) * ((rank - prev) / inside if inside else 0.0)
        lo, prev = hi, acc
    return lo


class Registry:
    """A set of named metrics.  Creating a metric that exists returns it (the
    kind, labels and buckets must match)."""

    def __init__(self):
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def _get(self, cls, name: str, help: str, labelnames: Sequence[str], **kw) -> Metric:
        with self._lock:
            m = self._metrics.get(name)
            if m is None:
                m = cls(name, help, labelnames, **kw)
                self._metrics[name] = m
                return m
        if type(m) is not cls or m.labelnames != tuple(labelnames):
            raise ValueError(f"metric {name} already exists as a {m.kind} with labels {m.labelnames}")
        if kw.get("buckets") is not None and isinstance(m, Histogram):
            b = sorted(float(x) for x in kw["buckets"])
            if b[-1] != _INF:
                b.append(_INF)
            if tuple(b) != m.buckets:
                raise ValueError(f"histogram {name} already exists with other buckets")
        return m

    def counter(self, name: str, help: str = "", labelnames: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, help, labelnames)

    def gauge(self, name: str, help: str = "", labelnames: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, help, labelnames)

    def histogram(self, name: str, help: str = "", labelnames: Sequence[str] = (),
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get(Histogram, name, help, labelnames, buckets=tuple(buckets))

    def metrics(self) -> list[Metric]:
        with self._lock:
            return list(self._metrics.values())

    def get(self, name: str) -> Optional[Metric]:
        return self._metrics.get(name)

    def clear(self) -> None:
        """Forget every metric (tests)."""
        with self._lock:
            self._metrics.clear()

    # ------------------------------------------------------------ reading
    def snapshot(self) -> dict:
        """``{name: {"type", "help", "values": [{"labels": {...}, "value": v}]}}``;
        a histogram's value is ``{"count", "sum", "buckets": {le: cumulative count}}``.
        JSON-serialisable."""
        out = {}
        for m in self.metrics():
            out[m.name] = {"type": m.kind, "help": m.help,
                           "values": [{"labels": lab, "value": v} for lab, v in m._series()]}
        return out

    def value(self, name: str, **labels):
        """One series' current value (0 / an empty histogram when never touched)."""
        m = self._metrics.get(name)
        if m is None:
            raise KeyError(name)
        if not m.labelnames:
            return m._value_snapshot()
        key = tuple(str(labels[n]) for n in m.labelnames)
        child = m._children.get(key)
        return child._value_snapshot() if child is not None else m._new_child(key)._value_snapshot()

    def render_text(self) -> str:
        """A short human-readable summary, one line per series."""
        lines = []
        for m in sorted(self.metrics(), key=lambda m: m.name):
            for lab, v in m._series():
                name = m.name + ("{" + ",".join(f"{k}={val}" for k, val in lab.items()) + "}" if lab else "")
                if isinstance(m, Histogram):
                    if not v["count"]:
                        lines.append(f"{name}: no observations")
                        continue
                    mean = v["sum"] / v["count"]
                    p50, p99 = quantile(v, 0.5), quantile(v, 0.99)
                    lines.append(f"{name}: n={v['count']} mean={_num(mean, m.name)} p50~{_num(p50, m.name)} "
                                 f"p99~{_num(p99, m.name)}")
                else:
                    lines.append(f"{name}: {_num(v, m.name)}")
        return "\n".join(lines)


def _num(x, name: str) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if name.endswith("_seconds"):
        return f"{x * 1e3:.3f} ms"
    if name.startswith("bytes") or name.endswith("_bytes") or name == BYTES_TOTAL:
        return f"{x / 2**20:.1f} MiB" if x >= 2**20 else f"{int(x)} B"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.2f}"
    return str(int(x))


#: the process-wide registry the endpoints record into
REGISTRY = Registry()


class StandardMetrics:
    """The endpoints' metrics, bound to one ``role`` ("language" or "encoder").

    Every method is one event; the children are bound once here so a call is
    one lock and a few additions.
    """

    def __init__(self, registry: Optional[Registry] = None, role: str = "language"):
        r = registry if registry is not None else REGISTRY
        self.registry = r
        self.role = role
        lab = ("role",)
        self.requests = r.counter(REQUESTS_TOTAL, "requests started", lab).labels(role)
        self.bytes = r.counter(BYTES_TOTAL, "embedding, fill_ids and mrope bytes moved", lab).labels(role)
        self.chunks = r.counter(CHUNKS_TOTAL, "chunks moved (one per init or resume)", lab).labels(role)
        self.resumes = r.histogram(RESUMES_PER_REQUEST, "resumes a successful request needed", lab,
                                   RESUME_BUCKETS).labels(role)
        self.wasted = r.histogram(WASTED_TOKENS, "tokens allocated but not filled, per successful request",
                                  lab, WASTED_TOKEN_BUCKETS).labels(role)
        self.pool_used = r.gauge(POOL_USED_BLOCKS, "blocks of the receive pool in use", lab).labels(role)
        self.pool_total = r.gauge(POOL_TOTAL_BLOCKS, "blocks of the receive pool", lab).labels(role)
        self._failures = r.counter(FAILURES_TOTAL, "requests that ended Failed, by cause", ("role", "cause"))
        self._failure_kids: dict[str, Counter] = {}
        self.latency = r.histogram(LATENCY_SECONDS, "request start to Success, seconds", lab,
                                   LATENCY_BUCKETS).labels(role)

    def request_started(self) -> None:
        self.requests.inc()

    def chunk(self, nbytes: int) -> None:
        """One chunk landed (language) or was written (encoder)."""
        self.chunks.inc()
        self.bytes.inc(nbytes)

    def request_succeeded(self, *, resumes: int, latency_s: float, wasted_tokens: int = 0) -> None:
        self.resumes.observe(resumes)
        self.latency.observe(latency_s)
        self.wasted.observe(wasted_tokens)

    def request_failed(self, cause: str) -> None:
        kid = self._failure_kids.get(cause)
        if kid is None:
            kid = self._failure_kids.setdefault(cause, self._failures.labels(self.role, cause))
        kid.inc()

    def pool(self, used_blocks: int, total_blocks: Optional[int] = None) -> None:
        self.pool_used.set(used_blocks)
        if total_blocks is not None:
            self.pool_total.set(total_blocks)


class EndpointStats(collections.Counter):
    """An endpoint's counters: the one place its events are recorded.

    ``endpoint.stats["resumes"]`` reads like a plain :class:`collections.Counter`
    (``dict(endpoint.stats)`` is the endpoint's own totals).  The events that
    have a process-wide series (requests, chunks and bytes, successes with
    their latency, resumes and waste, failures by cause, pool use) are recorded
    through the methods below, which update this counter *and*
    :data:`REGISTRY` in the same call: there is no second counter to keep in
    step.  Any other count is ``stats[name] += n`` (endpoint-only).
    """

    def __init__(self, role: str = "language", registry: Optional[Registry] = None):
        super().__init__()
        self.metrics = StandardMetrics(registry, role)

    def __reduce__(self):           # pickles / copies as the plain counter it reads as
        return collections.Counter, (dict(self),)

    def request_started(self, hinted: bool = False) -> None:
        self["requests"] += 1
        if hinted:
            self["hinted"] += 1
        self.metrics.request_started()

    def chunk(self, tokens: int, row_bytes: int) -> None:
        """A chunk of ``tokens`` embedding rows of ``row_bytes`` landed / was written
        (the registry's bytes also count fill_ids and mrope: 16 bytes a token)."""
        self["chunks"] += 1
        self["bytes"] += tokens * row_bytes
        self.metrics.chunk(tokens * (row_bytes + 16))

    def request_succeeded(self, *, resumes: int, latency_s: float, wasted_tokens: int = 0) -> None:
        self["success"] += 1
        self["wasted_tokens"] += wasted_tokens
        self.metrics.request_succeeded(resumes=resumes, latency_s=latency_s, wasted_tokens=wasted_tokens)

    def request_failed(self, cause: str) -> None:
        self["failed"] += 1
        self.metrics.request_failed(cause)

    def pool(self, used_blocks: int, total_blocks: Optional[int] = None) -> None:
        self.metrics.pool(used_blocks, total_blocks)


# ---------------------------------------------------------------- Prometheus
class _Collector:
    """prometheus_client collector that reads the registry on every scrape."""

    def __init__(self, registry: Registry, namespace: str):
        self.registry = registry
        self.namespace = namespace

    def describe(self):
        return []  # no eager collect at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        ns = self.namespace + "_" if self.namespace else ""
        for m in self.registry.metrics():
            names = list(m.labelnames)
            name = ns + m.name
            if isinstance(m, Counter):
                fam = CounterMetricFamily(name, m.help or m.name, labels=names)
                for lab, v in m._series():
                    fam.add_metric([lab[n] for n in names], v)
            elif isinstance(m, Gauge):
                fam = GaugeMetricFamily(name, m.help or m.name, labels=names)
                for lab, v in m._series():
                    fam.add_metric([lab[n] for n in names], v)
            else:
                fam = HistogramMetricFamily(name, m.help or m.name, labels=names)
                for lab, v in m._series():
                    fam.add_metric([lab[n] for n in names], list(v["buckets"].items()), v["sum"])
            yield fam


def export_prometheus(registry: Optional[Registry] = None, port: int = 0, addr: str = "127.0.0.1",
                      namespace: str = NAMESPACE):
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    Returns ``(server, port)`` (the real port when ``port=0``); stop with
    ``server.shutdown(); server.server_close()``.  Needs ``prometheus_client``
    (``pip install 'embresume[metrics]'``).  Binds to loopback by default.
    """
    try:
        import prometheus_client
        from prometheus_client import CollectorRegistry
    except ImportError as e:
        raise RuntimeError("export_prometheus needs prometheus_client: pip install prometheus-client "
                           "(or the package's 'metrics' extra)") from e
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    creg = CollectorRegistry(auto_describe=False)
    creg.register(_Collector(registry if registry is not None else REGISTRY, namespace))
    started = prometheus_client.start_http_server(port, addr=addr, registry=creg)
    if isinstance(started, tuple):  # prometheus_client >= 0.17: (server, thread)
        server = started[0]
    else:  # pragma: no cover - older prometheus_client returns None
        raise RuntimeError("prometheus_client >= 0.17 is needed (start_http_server must return the server)")
    return server, server.server_port
