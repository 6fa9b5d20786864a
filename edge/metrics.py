"""Prometheus metrics of the runtime and a tiny HTTP endpoint serving them.

:class:`RuntimeMetrics` holds the runtime's counters, gauges and per-stage
latency histograms. It uses ``prometheus_client`` when that package is
installed, else a small built-in implementation of the same text exposition
format (0.0.4): the runtime has no hard dependency on it. :class:`MetricsServer`
serves ``/metrics`` and ``/healthz`` from a daemon thread (``http.server``).
"""

import bisect
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Per-slice stage latencies run from ~0.1 ms (decode) to ~1 s (a CPU inference batch).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _label_text(names: Sequence[str], values: Sequence[str], extra: Tuple[Tuple[str, str], ...] = ()) -> str:
    pairs = list(zip(names, values)) + list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Dict[str, str]) -> Tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self, exposed_name: Optional[str] = None) -> List[str]:
        name = exposed_name or self.name
        return [f"# HELP {name} {self.help}", f"# TYPE {name} {self.kind}"]


class _BuiltinCounter(_Metric):
    kind = "counter"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: Dict[Tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def lines(self) -> List[str]:
        with self._lock:
            items = sorted(self._values.items())
        # the 0.0.4 text format names a counter family by its sample name, with _total
        return self.header(f"{self.name}_total") + [
            f"{self.name}_total{_label_text(self.labelnames, k)} {_format_value(v)}" for k, v in items
        ]


class _BuiltinGauge(_Metric):
    kind = "gauge"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: Dict[Tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def lines(self) -> List[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_label_text(self.labelnames, k)} {_format_value(v)}" for k, v in items]


class _BuiltinHistogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_text, labelnames, buckets):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._series: Dict[Tuple[str, ...], List] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            s = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)  # le: value <= bound
            if i < len(self.buckets):
                s[i] += 1
            s[-2] += value
            s[-1] += 1

    def lines(self) -> List[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, s in items:
            cumulative = 0
            for bound, n in zip(self.buckets, s):
                cumulative += n
                out.append(f"{self.name}_bucket{_label_text(self.labelnames, key, (('le', _format_value(bound)),))} {cumulative}")
            out.append(f"{self.name}_bucket{_label_text(self.labelnames, key, (('le', '+Inf'),))} {s[-1]}")
            out.append(f"{self.name}_sum{_label_text(self.labelnames, key)} {_format_value(s[-2])}")
            out.append(f"{self.name}_count{_label_text(self.labelnames, key)} {s[-1]}")
        return out


class _BuiltinRegistry:
    def __init__(self):
        self._metrics: List[_Metric] = []

    def counter(self, name, help_text, labelnames=()):
        return self._add(_BuiltinCounter(name, help_text, labelnames))

    def gauge(self, name, help_text, labelnames=()):
        return self._add(_BuiltinGauge(name, help_text, labelnames))

    def histogram(self, name, help_text, labelnames=(), buckets=LATENCY_BUCKETS):
        return self._add(_BuiltinHistogram(name, help_text, labelnames, buckets))

    def _add(self, metric):
        self._metrics.append(metric)
        return metric

    def render(self) -> bytes:
        lines = [line for m in self._metrics for line in m.lines()]
        return ("\n".join(lines) + "\n").encode()


class _ClientMetric:
    """prometheus_client metric behind the built-in one's interface (labels as keyword arguments)."""

    def __init__(self, metric, labelnames):
        self._metric = metric
        self.labelnames = tuple(labelnames)

    def _child(self, labels):
        return self._metric.labels(**labels) if self.labelnames else self._metric

    def inc(self, amount: float = 1.0, **labels) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, **labels) -> None:
        self._child(labels).set(value)

    def observe(self, value: float, **labels) -> None:
        self._child(labels).observe(value)



class _ClientRegistry:
    def __init__(self, prometheus_client):
        self._pc = prometheus_client
        self._registry = prometheus_client.CollectorRegistry(auto_describe=True)

    def counter(self, name, help_text, labelnames=()):
        return _ClientMetric(self._pc.Counter(name, help_text, labelnames, registry=self._registry), labelnames)

    def gauge(self, name, help_text, labelnames=()):
        return _ClientMetric(self._pc.Gauge(name, help_text, labelnames, registry=self._registry), labelnames)

    def histogram(self, name, help_text, labelnames=(), buckets=LATENCY_BUCKETS):
        return _ClientMetric(
            self._pc.Histogram(name, help_text, labelnames, buckets=buckets, registry=self._registry), labelnames
        )

    def render(self) -> bytes:
        return self._pc.generate_latest(self._registry)


def _make_registry(use_prometheus_client: Optional[bool]):
    if use_prometheus_client is False:
        return _BuiltinRegistry()
    try:
        import prometheus_client
    except ImportError:
        if use_prometheus_client:
            from edge.errors import MissingDependencyError

            raise MissingDependencyError("prometheus_client is not installed") from None
        return _BuiltinRegistry()
    return _ClientRegistry(prometheus_client)


class RuntimeMetrics:
    """The runtime's metrics. ``use_prometheus_client``: None = when installed, True/False = force.

    Gauges that mirror live state (queue depths, open series) are refreshed by
    callables registered with :meth:`on_scrape`, right before each rendering.
    """

    def __init__(self, prefix: str = "ct_edge", use_prometheus_client: Optional[bool] = None):
        r = _make_registry(use_prometheus_client)
        self.backend = "prometheus_client" if isinstance(r, _ClientRegistry) else "builtin"
        self._registry = r
        p = prefix
        self.received = r.counter(f"{p}_instances_received", "Instances accepted into the spool", ["source"])
        self.processed = r.counter(f"{p}_instances_processed", "Instances whose series results were committed")
        self.rejected = r.counter(f"{p}_instances_rejected", "Instances rejected (not analysed), by stage", ["stage"])
        self.out_of_resources = r.counter(f"{p}_out_of_resources", "C-STORE requests answered 0xA700 (queue full)")
        self.duplicates = r.counter(f"{p}_duplicate_instances", "Instances received again (already in the ledger)")
        self.findings = r.counter(f"{p}_findings", "Findings emitted")
        self.series = r.counter(f"{p}_series_completed", "Series results committed")
        self.export_failures = r.counter(f"{p}_export_failures", "Output writers that failed", ["output"])
        self.queue_depth = r.gauge(f"{p}_queue_depth", "Items waiting in a pipeline queue", ["queue"])
        self.open_series = r.gauge(f"{p}_open_series", "Series being assembled")
        self.in_flight = r.gauge(f"{p}_in_flight", "Instances admitted and not yet preprocessed")
        self.stage_latency = r.histogram(f"{p}_stage_latency_seconds", "Per-item processing time by pipeline stage", ["stage"])
        self._scrape_hooks: List[Callable[[], None]] = []

    def on_scrape(self, hook: Callable[[], None]) -> None:
        self._scrape_hooks.append(hook)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        for hook in self._scrape_hooks:
            try:
                hook()
            except Exception:  # a broken hook must not take /metrics down
                log.exception("metrics hook failed")
        return self._registry.render()


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (200 "ok" while ``health()`` is true, else 503)."""

    def __init__(self, metrics: RuntimeMetrics, host: str, port: int, health: Callable[[], Tuple[bool, str]] = lambda: (True, "ok")):
        self.metrics = metrics
        self.health = health
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, server.metrics.render(), CONTENT_TYPE)
                elif path == "/healthz":
                    ok, text = server.health()
                    self._send(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _send(self, code, body, content_type):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # scrapes every few seconds: keep them out of the log
                log.debug("metrics http: " + fmt, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def parse_samples(text: str) -> Iterable[Tuple[str, Dict[str, str], float]]:
    """(name, labels, value) of each sample line in a text exposition (for tests and tools)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        if rest:
            for part in _split_labels(rest.rstrip("}")):
                k, _, v = part.partition("=")
                labels[k] = v.strip('"').replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        yield name, labels, float(value)


def _split_labels(text: str) -> List[str]:
    parts, current, quoted, escaped = [], "", False, False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == '"':
            current += ch
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts
