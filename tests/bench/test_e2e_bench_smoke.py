"""Smoke test of bench/e2e_bench.py and bench/memory_soak.py: their core functions on a tiny input."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
from edge.decode.spec import DecodeSpec
from edge.ingest.pipeline import StageLatency
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec
from toolchain.export.onnx_export import export_onnx
from toolchain.models.centernet_unet import CenterNetUNet

ROOT = Path(__file__).resolve().parents[2]
SPECS = ModelSpecs(PreprocessSpec(out_height=64, out_width=64, slices=3, pixel_size_mm=5.0), DecodeSpec(stride=2))
SLICES = 5


def _load(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = sys.modules.get(f"bench.{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"bench.{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"bench.{name}"] = module
        spec.loader.exec_module(module)
    return module


e2e = _load("e2e_bench")
soak = _load("memory_soak")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny detector (torch module and its ONNX export) and one 5-slice 64x64 phantom series on disk."""
    base = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    model = CenterNetUNet(SPECS.preprocess.channels, widths=(8, 16), head_width=8).eval()
    onnx_path = base / "tiny.onnx"
    export_onnx(model, SPECS, onnx_path)
    series = e2e.write_phantom_series(base / "scanner", n_series=1, n_slices=SLICES, size=64)
    return model, onnx_path, series


def test_side_by_side_times_both_pipelines_per_slice(tiny):
    model, onnx_path, series = tiny
    chw = (SPECS.preprocess.channels, SPECS.preprocess.out_height, SPECS.preprocess.out_width)
    folder = Path(series[0][0]).parents[1]
    warm = folder.parent / "warm"
    warm.mkdir(exist_ok=True)
    for path in series[0][:3]:
        shutil.copy(path, warm / Path(path).name)
    with OnnxRuntimeRunner(onnx_path, intra_op_threads=1) as runner:
        ours = e2e.OfflineDetectPath(onnx_path, runner, SPECS, 2, 2, 1, StageLatency())
        try:
            results = e2e.run_side_by_side(series, folder, warm, e2e.NaivePipeline(model, chw, StageLatency()),
                                           ours, rounds=2)
        finally:
            ours.close()
    assert results["ours"]["cpu_ms_per_slice"] > 0 and len(results["round_ratios"]) == 2
    for name in ("naive", "ours"):
        assert results[name]["slices"] == 2 * SLICES
        assert results[name]["slices_per_s"] > 0
    assert results["ratio"] == pytest.approx(results["ours"]["slices_per_s"] / results["naive"]["slices_per_s"])
    for stage in e2e.OUR_STAGES:  # warm-up samples are not counted
        assert results["ours"]["latency"][stage]["n"] == 2 * SLICES, stage
    assert results["naive"]["latency"]["total"]["n"] == 2 * SLICES

    report = e2e.build_report(results, command="test", machine=e2e.machine_info(1), threads=(2, 2, 1),
                              model=(onnx_path, "tiny", True), specs=SPECS, input_dtype="float32",
                              naive=(chw, "tiny"), batch_size=2, rounds=1, data=(1, SLICES, 64))
    assert report["meets_target"] == (results["ratio"] >= e2e.TARGET_RATIO)
    md = Path(onnx_path).with_suffix(".md")
    e2e.write_markdown(report, md)
    text = md.read_text()
    assert "PRELIMINARY" in text and "Jetson AGX Orin" in text and "| preprocess |" in text
    assert "edge detect --workers 2" in text and "2 worker process(es) x 1 ONNX Runtime" in text


def test_service_row_processes_every_slice_over_cstore(tiny, tmp_path):
    _, onnx_path, series = tiny
    row = e2e.run_service(series, onnx_path, threads=1, batch_size=2, work_dir=tmp_path)
    assert row["stored"] == SLICES and row["failures"] == 0 and row["drained"]
    assert row["ledger"]["processed"] == SLICES
    assert row["latency"]["infer"]["n"] == SLICES


def test_fresh_instances_never_repeat_a_uid():
    templates = soak.template_datasets(64, 3)
    items = list(soak.fresh_instances(templates, 7))
    assert len(items) == 7
    assert len({key for key, _, _ in items}) == 7
    series = [ds.SeriesInstanceUID for _, ds, _ in items]
    assert len(set(series[:3])) == 1 and len(set(series)) == 3  # a new series every pass over the templates
    assert all(ds.SOPInstanceUID == key for key, ds, _ in items)


def test_soak_streams_every_frame_and_samples_rss(tiny, tmp_path):
    _, onnx_path, _ = tiny
    frames = 2 * SLICES  # two series, each complete
    calls = []

    def sample():
        calls.append(1)
        return float(len(calls))

    run = soak.run_soak(onnx_path, soak.template_datasets(64, SLICES), frames, sample_every=SLICES, work_dir=tmp_path,
                        threads=1, batch_size=2, series_idle_s=0.2, sample=sample)
    assert run["drained"] and not run["pipeline_errors"]
    assert run["ledger"]["processed"] == frames  # fresh UIDs: no instance was taken for a duplicate
    assert [f for f, _ in run["samples"]] == [0, SLICES, frames]


def test_rss_verdict_passes_flat_and_fails_a_leak():
    frames = list(range(0, 5001, 250))
    flat = soak.rss_verdict([(f, 300.0 + (f % 500) * 1e-3) for f in frames], warmup_frames=500)
    assert flat["passed"] and abs(flat["slope_mb_per_1000_frames"]) < 1.0
    per_frame_mb = 0.5  # a 512x512 int16 frame kept per frame
    leak = soak.rss_verdict([(f, 300.0 + per_frame_mb * f) for f in frames], warmup_frames=500)
    assert not leak["passed"]
    assert leak["slope_mb_per_1000_frames"] == pytest.approx(per_frame_mb * 1000)
    assert leak["first_mb"] == 300.0 and leak["max_mb"] == leak["last_mb"] == 300.0 + per_frame_mb * 5000
    with pytest.raises(ValueError):
        soak.rss_verdict([(0, 1.0), (10, 1.0)], warmup_frames=5)
