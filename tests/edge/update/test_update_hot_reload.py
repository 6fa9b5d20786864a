"""The running service picks up a newly installed model between series (``model.update_state_dir``)."""

import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ingest"))  # the ingest tests' helpers

from ingest_helpers import (  # noqa: E402
    Sphere, blob_specs, build_blob_model, free_port, sphere_hits, wait_until, write_series)
from update_helpers import build_bundle, installer, make_state, tiny_specs  # noqa: E402

from edge.backends.base import Runner  # noqa: E402
from edge.backends.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from edge.config import PipelineConfig, config_from_dict  # noqa: E402
from edge.detector import SeriesDetector  # noqa: E402
from edge.dicom import read_frames, read_header  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.ingest.pipeline import Instance, ModelProvider, Pipeline, PipelineSink, ServedModel  # noqa: E402
from edge.model_file import ModelSpecs  # noqa: E402
from edge.outputs.jsonl import read_jsonl  # noqa: E402
from edge.preprocess.spec import WINDOW_PRESETS  # noqa: E402
from edge.update.prepare import PreparedModel, open_prepared, prepare_model  # noqa: E402


def service_config(tmp_path, state_dir, **model):
    return config_from_dict({
        "scp": {"host": "127.0.0.1", "port": free_port(), "ae_title": "EDGE_TEST"},
        "storage": {"state_dir": str(tmp_path / "runtime")},
        "model": {"update_state_dir": str(state_dir), "batch_size": 4, **model},
        "pipeline": {"series_idle_s": 0.4, "reorder_timeout_s": 0.2, "max_in_flight": 16},
        "outputs": {"dir": str(tmp_path / "results"), "sr": False, "overlays": False},
        "metrics": {"enabled": False},
    }, source="test.toml")


def test_model_path_and_update_state_dir_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="model.path.*model.update_state_dir"):
        service_config(tmp_path, tmp_path / "device", path=str(tmp_path / "m.onnx"))
    assert service_config(tmp_path, tmp_path / "device").model.update_state_dir == str(tmp_path / "device")


def offline_findings(onnx, paths):
    with OnnxRuntimeRunner(onnx) as runner:
        findings = SeriesDetector(runner, tiny_specs()).detect([f for p in paths for f in read_frames(p)])
    return sorted((round(f.x, 2), round(f.y, 2), round(f.z, 2)) for f in findings)


def broken_runtime_installer(root):
    """An installer whose own checks see the bundled model but whose prepared.json names a file no
    runtime can load: the version installs, then cannot be opened by the running service."""
    good = {}

    def prepare(staged, manifest, backend):
        prepared = prepare_model(staged, manifest, backend)
        good["artifact"] = prepared.artifact
        junk = Path(staged) / "prepared" / "model.onnx"
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(b"not an ONNX model")
        PreparedModel(Path(staged), prepared.backend, "prepared/model.onnx", prepared.specs).write()
        return prepared

    def open_checked(folder):
        return dataclasses.replace(open_prepared(folder), artifact=good["artifact"])

    return installer(root, prepare=prepare, open_version=open_checked)


def test_the_service_picks_up_each_installed_model_between_series(tmp_path, models, signing_key, monkeypatch, caplog):
    from edge.ingest.replay import replay_cstore
    from edge.ingest.service import EdgeService

    root = make_state(tmp_path / "device", signing_key)
    inst = installer(root)
    inst.apply(build_bundle(tmp_path / "a.tar.gz", models, signing_key, 1, model="a"))
    # loading version 2 waits for this gate: a slow model load, during which images must keep landing
    gate = threading.Event()

    def slow_open(folder):
        if Path(folder).name.startswith("2-"):
            gate.wait(30)
        return open_prepared(folder)

    monkeypatch.setattr("edge.update.prepare.open_prepared", slow_open)
    service = EdgeService(service_config(tmp_path, root)).start()
    pushed = []

    def push(name, seed):
        series = write_series(tmp_path / name, n_slices=6, spheres=[Sphere(8.0, -6.0, 0.0)], seed=seed)
        report = replay_cstore(series.paths, "127.0.0.1", service.scp_port, called_ae="EDGE_TEST", retry_delay_s=0.05)
        assert report.stored == 6 and not report.failures
        pushed.append(series)
        return series

    def all_committed():
        counts = service.ledger.counts()
        return counts["processed"] == 6 * len(pushed) and counts["received"] == 0 and service.pipeline.is_idle()

    try:
        assert service.model["installed"] == "1-1.1.0"
        s1 = push("s1", 1)
        assert wait_until(all_committed, 20)
        runner_a = service.runner

        inst.apply(build_bundle(tmp_path / "b.tar.gz", models, signing_key, 2, model="b"))
        assert wait_until(lambda: service.provider.loading, 10)  # the idle pipeline noticed the new version
        during = push("during", 2)  # every C-STORE succeeds while version 2 loads...
        assert wait_until(all_committed, 20)  # ...and the series is processed by the model in service
        assert service.model["installed"] == "1-1.1.0" and runner_a.is_active
        gate.set()
        assert wait_until(lambda: service.model["installed"] == "2-1.2.0", 20)
        assert wait_until(lambda: not runner_a.is_active, 5)  # released: no open series uses it
        s2 = push("s2", 3)
        assert wait_until(all_committed, 20)

        broken_runtime_installer(root).apply(build_bundle(tmp_path / "c.tar.gz", models, signing_key, 3, model="a"))
        assert wait_until(lambda: service.provider.error is not None, 10)
        ok, text = service.health()
        assert ok and "model update not in service: cannot load 3-1.3.0" in text, text
        assert "2-1.2.0" == service.model["installed"] and service.runner.is_active
        s3 = push("s3", 4)
        assert wait_until(all_committed, 20)
        time.sleep(1.2)  # a few more polls of the pipeline: the failure is not retried or logged again
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR and "cannot load 3-1.3.0" in r.getMessage()]
        assert len(failures) == 1
        assert not service.pipeline.errors
    finally:
        gate.set()
        service.drain(timeout=10)
        service.close()

    summaries = {s["series_uid"]: s for s in read_jsonl(tmp_path / "results" / "series.jsonl")}
    expected = {s1.series_uid: ("1-1.1.0", "a"), during.series_uid: ("1-1.1.0", "a"),
                s2.series_uid: ("2-1.2.0", "b"), s3.series_uid: ("2-1.2.0", "b")}
    assert sorted(summaries) == sorted(expected)
    findings = read_jsonl(tmp_path / "results" / "findings.jsonl")
    for series in pushed:
        summary = summaries[series.series_uid]
        installed, model = expected[series.series_uid]
        assert summary["model"]["installed"] == installed
        assert summary["model"]["release"] == installed.split("-")[0]
        # the findings are those of that model's weights, not just its label
        got = sorted((round(f["x"], 2), round(f["y"], 2), round(f["z"], 2)) for f in findings
                     if f["series_uid"] == series.series_uid)
        other = "b" if model == "a" else "a"
        want = offline_findings(models[model][0], series.paths)
        assert got == want and want != offline_findings(models[other][0], series.paths)
    # exactly once: every instance processed, in exactly one series result
    uids = [u for s in summaries.values() for u in s["sop_instance_uids"]]
    assert sorted(uids) == sorted(u for s in pushed for u in s.sop_uids)


class CollectingSink(PipelineSink):
    def __init__(self):
        self.rejected, self.commits = [], []

    def reject(self, instance, reason, stage):
        self.rejected.append((instance.key, reason, stage))

    def commit(self, outcome):
        self.commits.append(outcome)


class SwitchingProvider(ModelProvider):
    """Serves ``model``; switches to ``next`` at the next refresh (the pipeline refreshes before opening a series)."""

    def __init__(self, model: ServedModel):
        self.model, self.next = model, None
        self.switched = threading.Event()

    def current(self):
        return self.model

    def refresh(self):
        if self.next is not None:
            old, self.model, self.next = self.model, self.next, None
            old.release()
            self.switched.set()

    def close(self):
        self.model.release()


def served_blob(path, specs, version, calls):
    runner = OnnxRuntimeRunner(build_blob_model(path, specs), intra_op_threads=1).activate()
    infer = runner.infer

    def recording_infer(feed):
        calls.append((version, next(iter(feed.values())).shape))
        return infer(feed)

    runner.infer = recording_infer
    return ServedModel(runner, specs, {"name": "blob", "version": version}, on_unused=Runner.deactivate)


def submit(pipeline, paths):
    for p in paths:
        assert pipeline.admit(timeout=10)
        pipeline.submit(Instance(key=read_header(p).sop_uid, source="test", path=str(p), frames=read_frames(p),
                                 received_at=time.perf_counter()))


def test_a_series_open_during_the_switch_finishes_on_the_old_model(tmp_path):
    calls = []
    # B needs other planes (a second window); its heatmap still reads the centre slice's lung window
    two_windows = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"])
    spec_b = dataclasses.replace(blob_specs().preprocess, windows=two_windows)
    old = served_blob(tmp_path / "a.onnx", blob_specs(), "A", calls)
    new = served_blob(tmp_path / "b.onnx", ModelSpecs(spec_b, blob_specs().decode, {}), "B", calls)
    provider = SwitchingProvider(old)
    sink = CollectingSink()
    settings = PipelineConfig(series_idle_s=60, reorder_timeout_s=60, min_slices=1)  # the clock stands still
    pipeline = Pipeline(None, None, settings, sink, batch_size=1, clock=lambda: 0.0, provider=provider).start()
    x = write_series(tmp_path / "x", n_slices=6, spheres=[Sphere(8.0, -6.0, 0.0)], seed=1)
    y = write_series(tmp_path / "y", n_slices=6, spheres=[Sphere(-10.0, 5.0, 2.0)], seed=2)
    try:
        submit(pipeline, x.paths[1:3])  # series x opens on A; its images 2, 3 wait for image 1
        assert wait_until(lambda: pipeline.open_series == 1)
        provider.next = new
        submit(pipeline, y.paths[:1])  # preprocessed for A, then opens series y: the switch happens here
        assert provider.switched.wait(10)
        assert old.users == 1 and old.runner.is_active  # the provider let go of A; series x holds it
        # the rest of x is preprocessed for B now, and x's detector made only now: x still runs on A
        submit(pipeline, x.paths[:1] + x.paths[3:] + y.paths[1:])
        assert pipeline.close_all(timeout=20)
    finally:
        pipeline.stop()
    outcomes = {o.series_uid: o for o in sink.commits}
    assert not sink.rejected and sorted(outcomes) == sorted([x.series_uid, y.series_uid])
    for series, version in ((x, "A"), (y, "B")):
        outcome = outcomes[series.series_uid]
        assert outcome.model == {"name": "blob", "version": version}
        assert sorted(outcome.processed_keys) == sorted(series.sop_uids) and len(outcome.members) == 6
        assert len(sphere_hits(outcome.findings, series.spheres, tol_mm=3.0)) == 1
    assert sorted(calls) == [("A", (1, 3, 64, 64))] * 6 + [("B", (1, 6, 64, 64))] * 6
    assert not old.runner.is_active and old.users == 0  # released when series x closed
    assert new.runner.is_active and new.users == 1  # the provider's own reference
    provider.close()
    assert not new.runner.is_active
