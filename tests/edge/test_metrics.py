"""Prometheus metrics: the text exposition (built-in and prometheus_client) and the HTTP endpoint."""

import urllib.error
import urllib.request

import pytest

from edge.metrics import MetricsServer, RuntimeMetrics, parse_samples

BACKENDS = [False] + ([True] if __import__("importlib").util.find_spec("prometheus_client") else [])


@pytest.mark.parametrize("use_client", BACKENDS)
def test_exposition_has_counters_gauges_and_histograms(use_client):
    m = RuntimeMetrics(use_prometheus_client=use_client)
    assert m.backend == ("prometheus_client" if use_client else "builtin")
    m.received.inc(source="scp")
    m.received.inc(2, source="watch")
    m.rejected.inc(stage="receive")
    m.queue_depth.set(3, queue="infer")
    for v in (0.0004, 0.003, 0.003, 2.0):
        m.stage_latency.observe(v, stage="infer")
    m.on_scrape(lambda: m.open_series.set(5))
    text = m.render().decode()
    samples = {(n, tuple(sorted(l.items()))): v for n, l, v in parse_samples(text)}
    assert samples[("ct_edge_instances_received_total", (("source", "scp"),))] == 1
    assert samples[("ct_edge_instances_received_total", (("source", "watch"),))] == 2
    assert samples[("ct_edge_instances_rejected_total", (("stage", "receive"),))] == 1
    assert samples[("ct_edge_queue_depth", (("queue", "infer"),))] == 3
    assert samples[("ct_edge_open_series", ())] == 5
    assert samples[("ct_edge_stage_latency_seconds_count", (("stage", "infer"),))] == 4
    assert samples[("ct_edge_stage_latency_seconds_sum", (("stage", "infer"),))] == pytest.approx(2.0064)
    buckets = sorted((float(dict(l)["le"]), v) for (n, l), v in samples.items()
                     if n == "ct_edge_stage_latency_seconds_bucket")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 4  # cumulative, +Inf holds all
    assert dict(buckets)[0.0005] == 1 and dict(buckets)[0.005] == 3 and dict(buckets)[2.5] == 4
    assert "# TYPE ct_edge_stage_latency_seconds histogram" in text


def test_builtin_exposition_parses_with_the_reference_parser():
    parser = pytest.importorskip("prometheus_client.parser")
    m = RuntimeMetrics(use_prometheus_client=False)
    m.received.inc(source='we"ird\\name')
    m.stage_latency.observe(0.01, stage="decode")
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render().decode())}
    assert families["ct_edge_instances_received"].type == "counter"
    assert families["ct_edge_stage_latency_seconds"].type == "histogram"
    assert "unknown" not in {f.type for f in families.values()}  # every sample belongs to its declared family
    (sample,) = families["ct_edge_instances_received"].samples
    assert sample.labels == {"source": 'we"ird\\name'} and sample.value == 1


def test_labels_must_match():
    m = RuntimeMetrics(use_prometheus_client=False)
    with pytest.raises(ValueError):
        m.received.inc(stage="x")


def test_http_endpoint_serves_metrics_and_health():
    m = RuntimeMetrics(use_prometheus_client=False)
    state = {"ok": True}
    server = MetricsServer(m, "127.0.0.1", 0, lambda: (state["ok"], "fine" if state["ok"] else "draining")).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b"ct_edge_instances_processed_total 0" in r.read()
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200 and r.read() == b"fine\n"
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert e.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/nope", timeout=5)
        assert e.value.code == 404
    finally:
        server.stop()
