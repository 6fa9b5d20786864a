"""The pipeline's stages: bounded admission, rejection by stage, series closing, latency records."""

import threading
import time

import pytest
from ingest_helpers import Sphere, sphere_hits, wait_until, write_series

from edge.config import PipelineConfig
from edge.dicom import read_frames, read_header
from edge.ingest.assembly import LOCALIZER_REASON
from edge.ingest.pipeline import Instance, Pipeline, PipelineSink
from edge.metrics import RuntimeMetrics, parse_samples
from edge.model_file import ModelSpecs


class CollectingSink(PipelineSink):
    def __init__(self):
        self.rejected, self.findings, self.commits = [], [], []
        self.lock = threading.Lock()

    def reject(self, instance, reason, stage):
        with self.lock:
            self.rejected.append((instance.key, reason, stage))

    def finding(self, study_uid, series_uid, finding):
        with self.lock:
            self.findings.append((series_uid, finding))

    def commit(self, outcome):
        with self.lock:
            self.commits.append(outcome)


@pytest.fixture()
def build(blob_runner):
    specs = ModelSpecs.from_metadata(blob_runner.custom_metadata())
    made = []

    def make(**settings):
        base = dict(series_idle_s=30.0, reorder_timeout_s=0.2)
        base.update(settings)
        sink = CollectingSink()
        metrics = RuntimeMetrics(use_prometheus_client=False)
        p = Pipeline(blob_runner, specs, PipelineConfig(**base), sink, metrics, batch_size=4).start()
        made.append(p)
        return p, sink

    yield make
    for p in made:
        p.stop()


def submit_files(pipeline, paths, decoded=True):
    for p in paths:
        assert pipeline.admit(timeout=10)
        frames = read_frames(p) if decoded else None
        key = read_header(p).sop_uid
        pipeline.submit(Instance(key=key, source="test", path=str(p), frames=frames, received_at=time.perf_counter()))


def test_two_interleaved_series_are_committed_with_their_findings(build, tmp_path):
    pipeline, sink = build()
    a = write_series(tmp_path / "a", n_slices=10, spheres=[Sphere(8.0, -6.0, 0.0)], seed=1)
    b = write_series(tmp_path / "b", n_slices=10, spheres=[Sphere(-10.0, 5.0, 2.0)], seed=2)
    interleaved = [p for pair in zip(a.paths, b.paths) for p in pair]
    submit_files(pipeline, interleaved[:10], decoded=True)
    submit_files(pipeline, interleaved[10:], decoded=False)  # read by the decode stage, as after a restart
    assert pipeline.close_all(timeout=30)
    assert sorted(o.series_uid for o in sink.commits) == sorted([a.series_uid, b.series_uid])
    for outcome, series in ((o, s) for o in sink.commits for s in (a, b) if o.series_uid == s.series_uid):
        assert sorted(outcome.processed_keys) == sorted(series.sop_uids)
        assert outcome.closed_reason == "drain" and outcome.streamed
        assert len(sphere_hits(outcome.findings, series.spheres, tol_mm=2.5)) == 1
    assert len(sink.findings) == 2  # every finding was also reported on its own, once
    summary = pipeline.latency.summary()
    for stage in ("decode", "preprocess", "infer", "postprocess", "slice_latency", "output"):
        assert summary[stage]["n"] > 0 and summary[stage]["p99_ms"] >= summary[stage]["p50_ms"] >= 0
    assert summary["infer"]["n"] == 20
    assert pipeline.is_idle()


def test_idle_series_are_closed_and_unreadable_files_rejected(build, tmp_path):
    pipeline, sink = build(series_idle_s=0.3)
    series = write_series(tmp_path / "s", n_slices=5)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    submit_files(pipeline, series.paths)
    assert pipeline.admit(timeout=5)
    pipeline.submit(Instance(key="1.2.3.4", source="test", path=str(junk)))
    assert wait_until(lambda: len(sink.commits) == 1, timeout=10)
    assert sink.commits[0].closed_reason == "idle"
    assert [(k, stage) for k, _, stage in sink.rejected] == [("1.2.3.4", "decode")]
    assert "not" in sink.rejected[0][1]
    assert pipeline.in_flight == 0


def test_a_localizer_is_rejected_and_does_not_hold_up_the_series(build, tmp_path):
    pipeline, sink = build()
    series = write_series(tmp_path / "s", n_slices=5)
    scout = read_frames(series.paths[0])
    import dataclasses

    scout = [dataclasses.replace(f, is_localizer=True, sop_uid="1.2.3.99", instance_number=0) for f in scout]
    assert pipeline.admit(1)
    pipeline.submit(Instance(key="1.2.3.99", source="test", frames=scout))
    submit_files(pipeline, series.paths)
    assert pipeline.close_all(timeout=20)
    assert sink.rejected == [("1.2.3.99", LOCALIZER_REASON, "preprocess")]
    assert sorted(sink.commits[0].processed_keys) == sorted(series.sop_uids)


def test_admission_is_bounded_and_a_stalled_inference_holds_a_bounded_amount(build, tmp_path, blob_runner):
    pipeline, sink = build(max_in_flight=3, infer_queue=2)
    gate = threading.Event()
    infer = blob_runner.infer
    blob_runner.infer = lambda feed: (gate.wait(20), infer(feed))[1]
    try:
        series = write_series(tmp_path / "s", n_slices=16)
        admitted = 0
        deadline = time.monotonic() + 10
        i = 0
        while time.monotonic() < deadline and i < len(series.paths):
            if pipeline.try_admit():
                pipeline.submit(Instance(key=series.sop_uids[i], source="test", frames=read_frames(series.paths[i])))
                admitted += 1
                i += 1
            else:
                time.sleep(0.05)
                if not pipeline.try_admit():
                    break  # refused with everything stalled: the bound is reached
                pipeline.release()
        # slots (3) + infer queue (2) + what the detector holds for one batch (4 + 1 neighbour)
        assert admitted <= 3 + 2 + 5 + 1
        assert not pipeline.try_admit()
        depths = pipeline.queue_depths()
        assert depths["infer"] <= 2 and depths["decode"] + depths["preprocess"] <= 3
    finally:
        gate.set()
        blob_runner.infer = infer
    for path, key in zip(series.paths[i:], series.sop_uids[i:]):
        assert pipeline.admit(timeout=10)
        pipeline.submit(Instance(key=key, source="test", frames=read_frames(path)))
    assert pipeline.close_all(timeout=30)
    assert sorted(sink.commits[0].processed_keys) == sorted(series.sop_uids)


def test_max_open_series_closes_the_oldest(build, tmp_path):
    pipeline, sink = build(max_open_series=1)
    a = write_series(tmp_path / "a", n_slices=4, seed=1)
    b = write_series(tmp_path / "b", n_slices=4, seed=2)
    submit_files(pipeline, a.paths)
    assert wait_until(lambda: pipeline.open_series == 1 and pipeline.in_flight == 0, timeout=10)
    submit_files(pipeline, b.paths)
    assert wait_until(lambda: len(sink.commits) == 1, timeout=10)
    assert sink.commits[0].series_uid == a.series_uid and sink.commits[0].closed_reason == "max_open_series"
    assert pipeline.close_all(timeout=10)
    assert [o.series_uid for o in sink.commits] == [a.series_uid, b.series_uid]


def test_queue_gauges_are_exported(build, tmp_path):
    pipeline, _ = build()
    text = pipeline.metrics.render().decode()
    queues = {labels["queue"] for name, labels, _ in parse_samples(text) if name == "ct_edge_queue_depth"}
    assert queues == {"decode", "preprocess", "infer", "output"}


def test_each_outcome_carries_its_models_report_threshold(blob_runner, tmp_path):
    import dataclasses

    specs = ModelSpecs.from_metadata(blob_runner.custom_metadata())
    assert specs.decode.report_threshold is None
    tuned = dataclasses.replace(specs, decode=dataclasses.replace(specs.decode, report_threshold=0.37))
    sink = CollectingSink()
    pipeline = Pipeline(blob_runner, tuned, PipelineConfig(series_idle_s=30.0, reorder_timeout_s=0.2), sink,
                        RuntimeMetrics(use_prometheus_client=False), batch_size=4).start()
    try:
        series = write_series(tmp_path / "a", n_slices=6, seed=3)
        submit_files(pipeline, series.paths)
        assert pipeline.close_all(timeout=30)
    finally:
        pipeline.stop()
    (outcome,) = sink.commits
    assert outcome.report_threshold == 0.37
