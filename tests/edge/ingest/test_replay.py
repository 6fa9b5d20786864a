"""Replay as a scanner would: scanner order, pacing, into a local pipeline or over C-STORE."""

import random
import shutil

import pytest
from ingest_helpers import free_port, write_series

from edge.config import config_from_dict
from edge.dicom import read_header
from edge.errors import DicomError, EdgeError
from edge.ingest.replay import RatePacer, replay_cstore, replay_local, replay_order
from edge.ingest.service import EdgeService
from edge.outputs.jsonl import read_jsonl


def test_replay_order_is_series_then_instance_number(tmp_path):
    a = write_series(tmp_path / "src_a", n_slices=4, seed=1)
    b = write_series(tmp_path / "src_b", n_slices=3, seed=2)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    names = [f"{i:03d}" for i in range(7)]
    random.Random(0).shuffle(names)
    for name, path in zip(names, a.paths + b.paths):
        shutil.copy(path, mixed / name)
    (mixed / "README.txt").write_text("not dicom")
    files, skipped = replay_order(mixed)
    assert [s.endswith("README.txt") for s in skipped] == [True]
    headers = [read_header(p) for p in files]
    series = [h.series_uid for h in headers]
    assert series == sorted(series, key=series.index)  # each series contiguous
    for uid in (a.series_uid, b.series_uid):
        numbers = [h.instance_number for h in headers if h.series_uid == uid]
        assert numbers == sorted(numbers)
    with pytest.raises(DicomError):
        replay_order(tmp_path / "missing")


def test_rate_pacer_keeps_the_rate_without_drift():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    pacer = RatePacer(10.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(11):
        pacer.wait()
        now[0] += 0.03  # work per item
    assert now[0] == pytest.approx(1.0 + 0.03, abs=1e-9)
    RatePacer(None).wait()
    with pytest.raises(EdgeError):
        RatePacer(0)


def make_config(tmp_path, model, **scp):
    return config_from_dict({
        "scp": dict({"host": "127.0.0.1", "port": free_port(), "ae_title": "EDGE_TEST"}, **scp),
        "storage": {"state_dir": str(tmp_path / "state")},
        "model": {"path": str(model)},
        "pipeline": {"series_idle_s": 30.0},
        "outputs": {"dir": str(tmp_path / "results"), "sr": False, "overlays": False},
        "metrics": {"enabled": False},
    }, source="test.toml")


def test_replay_into_a_local_pipeline(tmp_path, blob_model):
    series = write_series(tmp_path / "src", n_slices=6)
    service = EdgeService(make_config(tmp_path, blob_model)).start(receive=False)
    try:
        files, _ = replay_order(tmp_path / "src")
        report = replay_local(files, service.intake)
        assert service.drain(timeout=20)
    finally:
        service.close()
    assert report.sent == report.stored == 6 and not report.failures
    (summary,) = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert sorted(summary["sop_instance_uids"]) == sorted(series.sop_uids)


def test_replay_over_cstore_at_a_rate(tmp_path, blob_model):
    series = write_series(tmp_path / "src", n_slices=6)
    service = EdgeService(make_config(tmp_path, blob_model)).start()
    try:
        report = replay_cstore(series.paths, "127.0.0.1", service.scp_port, called_ae="EDGE_TEST", rate=20.0)
        assert report.stored == 6
        assert report.elapsed_s >= 5 / 20.0 - 0.01
        with pytest.raises(ConnectionError):
            replay_cstore(series.paths, "127.0.0.1", service.scp_port, called_ae="WRONG_AE", max_retries=0)
    finally:
        service.drain(timeout=20)
        service.close()
