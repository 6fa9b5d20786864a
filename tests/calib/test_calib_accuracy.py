import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from calib.accuracy import (
    ErrorAccumulator,
    compare_runners,
    detect_with_model,
    match_findings,
    onnxrt_runner,
    peak_mask,
)
from calib.data_loader import CalibrationDataLoader
from calib.phantom_pool import ensure_phantom_pool
from calib.pipeline import CalibrationSettings, calibrate
from calib.trt_cache import read_calibration_cache
from edge.backends.cpu_features import SATURATING_KERNELS, integer_kernels_saturate
from edge.decode.spec import DecodeSpec
from edge.model_file import ModelSpecs
from edge.phantom import generate_series
from edge.preprocess.spec import PreprocessSpec

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64


def blob_detector(path, gain=20.0, offset=3.0):
    """A hand-made detector with the runtime's interface that finds bright spots:
    heatmap = sigmoid(gain * relu(centre-surround of the middle slice) - offset); size and offset from the same map."""
    x = gs.Variable("input", np.float32, ("batch", 3, SIZE, SIZE))
    k = np.zeros((4, 3, 3, 3), np.float32)
    k[0, 1] = -1.0 / 8
    k[0, 1, 1, 1] = 1.0
    k[1, 1, 1, 1] = 1.0
    f, r, logits = (gs.Variable(n, np.float32) for n in ("f", "r", "logits"))
    half = SIZE // 2
    out = {n: gs.Variable(n, np.float32, ("batch", c, half, half)) for n, c in (("heatmap", 1), ("size", 1), ("offset", 2))}
    w_hm = np.zeros((1, 4, 1, 1), np.float32)
    w_hm[0, 0] = gain
    const = lambda name, v: gs.Constant(name, np.asarray(v, np.float32))  # noqa: E731
    nodes = [
        gs.Node("Conv", "stem", {"pads": [1, 1, 1, 1], "strides": [2, 2]}, [x, const("stem.w", k), const("stem.b", np.zeros(4))], [f]),
        gs.Node("Relu", "relu", inputs=[f], outputs=[r]),
        gs.Node("Conv", "hm", {}, [r, const("hm.w", w_hm), const("hm.b", [-offset])], [logits]),
        gs.Node("Sigmoid", "sigmoid", inputs=[logits], outputs=[out["heatmap"]]),
        gs.Node("Conv", "size", {}, [r, const("size.w", np.full((1, 4, 1, 1), 0.5)), const("size.b", [2.0])], [out["size"]]),
        gs.Node("Conv", "offset", {}, [r, const("offset.w", np.full((2, 4, 1, 1), 0.1)), const("offset.b", [0.0, 0.0])],
                [out["offset"]]),
    ]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=list(out.values()), opset=17))
    model.ir_version = 8
    specs = ModelSpecs(PreprocessSpec(out_height=SIZE, out_width=SIZE, slices=3, pixel_size_mm=5.0),
                       DecodeSpec(stride=2, score_threshold=0.3))
    for key, value in specs.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    base = tmp_path_factory.mktemp("acc")
    pool = ensure_phantom_pool(base / "pool", series_per_profile=1, seed=2, size=SIZE,
                               profiles=("ge_standard", "siemens_b30f"), n_slices=12, log=lambda _: None)
    model = blob_detector(base / "blob.onnx")
    lines = []
    artifacts = calibrate(model, pool, base / "out", CalibrationSettings(n=16, method="percentile", trt_version="8.5.2"),
                          log=lines.append)
    return pool, model, artifacts, lines


def test_peak_mask_marks_local_maxima_above_threshold():
    hm = np.zeros((2, 1, 6, 6), np.float32)
    hm[0, 0, 1, 1] = 0.9
    hm[0, 0, 1, 2] = 0.5  # beside a higher one
    hm[0, 0, 4, 4] = 0.2  # below threshold
    hm[1, 0, 3, 3] = 0.4
    mask = peak_mask(hm, 0.3)
    assert list(zip(*np.nonzero(mask))) == [(0, 0, 1, 1), (1, 0, 3, 3)]


def test_error_statistics_separate_peak_cells():
    ref = {"heatmap": np.zeros((1, 1, 4, 4), np.float32), "size": np.full((1, 1, 4, 4), 5.0, np.float32)}
    ref["heatmap"][0, 0, 2, 2] = 0.8
    cand = {"heatmap": ref["heatmap"] + 0.01, "size": ref["size"].copy()}
    cand["size"][0, 0, 2, 2] += 0.5  # the only cell the decoder reads
    cand["size"][0, 0, 0, 0] -= 0.1
    acc = ErrorAccumulator(peak_threshold=0.3)
    acc.add(ref, cand)
    errors = acc.result()
    assert errors["heatmap"].mean_abs == pytest.approx(0.01) and errors["heatmap"].peak_cells == 1
    assert errors["size"].peak_max_abs == pytest.approx(0.5) and errors["size"].max_abs == pytest.approx(0.5)
    assert errors["size"].median_abs == 0.0 and errors["size"].mean_abs == pytest.approx(0.6 / 16)
    assert errors["size"].reference_max_abs == 5.0


def test_findings_match_one_to_one_within_the_tolerance():
    F = lambda x, p=0.9: SimpleNamespace(x=x, y=0.0, z=0.0, probability=p)  # noqa: E731
    a = [F(0.0), F(10.0), F(20.0)]
    b = [F(0.3, 0.8), F(0.5), F(10.9), F(40.0)]
    agreement = match_findings(a, b, tolerance_mm=1.0)
    assert agreement.matched == 2 and not agreement.identical
    assert agreement.max_distance_mm == pytest.approx(0.9)
    assert agreement.max_probability_diff == pytest.approx(0.1)
    assert [f[0] for f in agreement.reference_only] == [20.0]
    assert sorted(f[0] for f in agreement.candidate_only) == [0.5, 40.0]
    assert match_findings(a, a).identical


def test_calibration_writes_every_artifact(calibrated):
    _, _, art, lines = calibrated
    for path in (art.manifest, art.histograms, art.ranges, art.qdq_onnx, art.cpu_onnx, art.cache, art.check_file):
        assert path.is_file(), path
    assert art.n_slices == 16 and len(art.calibration_sha256) == 64
    assert all(r.ok for r in art.checks.values())
    cache = read_calibration_cache(art.cache)
    assert cache.version == 8502 and "input" in cache.scales and "r" in cache.scales
    assert art.cache.name == "blob.trt-8502.calib.cache"
    assert any("selected 16 calibration slice(s)" in line for line in lines)


# the fused integer kernels only where they do not saturate (the runtime refuses INT8 elsewhere);
# the Q/DQ nodes as written on every CPU
FUSED_OR_AS_WRITTEN = [
    pytest.param(False, id="fused", marks=pytest.mark.skipif(integer_kernels_saturate(), reason=SATURATING_KERNELS)),
    pytest.param(True, id="qdq-as-written"),
]


@pytest.mark.parametrize("as_written", FUSED_OR_AS_WRITTEN)
def test_int8_blob_detector_agrees_with_fp32(calibrated, as_written):
    pool, model, art, _ = calibrated
    loader = CalibrationDataLoader.for_model(model, art.manifest)
    comparisons = compare_runners([onnxrt_runner(model, "fp32"), onnxrt_runner(art.qdq_onnx, "int8-trt", as_written),
                                   onnxrt_runner(art.cpu_onnx, "int8-cpu", as_written)], loader, peak_threshold=0.3)
    assert [c.candidate for c in comparisons] == ["int8-trt", "int8-cpu"]
    for c in comparisons:
        assert c.polygraphy_passed and c.iterations == 16
        hm = c.errors["heatmap"]
        assert hm.peak_cells > 0 and hm.peak_max_abs < 0.1 and hm.mean_abs < 0.01
    frames = generate_series(3, "ge_standard", size=SIZE, n_slices=12, n_nodules=3).frames()
    fp32 = detect_with_model(model, frames)
    int8 = detect_with_model(art.cpu_onnx, frames, as_written)
    assert len(fp32) >= 10
    # this toy has 10 mm output cells and no trained offsets: 1 mm is the student's bar, half a cell is this one's
    strict, loose = match_findings(fp32, int8, tolerance_mm=1.0), match_findings(fp32, int8, tolerance_mm=5.0)
    assert strict.matched <= loose.matched and loose.matched >= 0.8 * len(fp32), loose.format()
    assert abs(len(int8) - len(fp32)) <= 0.1 * len(fp32) and loose.max_probability_diff < 0.1


def load_cli():
    spec = importlib.util.spec_from_file_location("check_accuracy_cli", ROOT / "tools" / "check_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("as_written", FUSED_OR_AS_WRITTEN)
def test_check_accuracy_cli(calibrated, tmp_path, capsys, monkeypatch, as_written):
    pool, model, art, _ = calibrated
    cli = load_cli()
    monkeypatch.setattr(cli, "_phantom_frames",
                        lambda: (generate_series(3, "ge_standard", size=SIZE, n_slices=10).frames(), "small phantom"))
    out_json = tmp_path / "acc.json"
    rc = cli.main(["--onnx", str(model), "--int8", str(art.cpu_onnx), "--manifest", str(art.manifest), "--limit", "4",
                   "--cpm-data", str(pool / "ge_standard"), "--annotations", str(pool / "ge_standard" / "annotations.csv"),
                   "--json", str(out_json)] + ["--qdq-as-written"] * as_written)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "vs fp32-onnxruntime over 4 input(s)" in out and "on the small phantom: findings within 1 mm" in out
    assert "CPM on 1 scan(s)" in out
    report = json.loads(out_json.read_text())
    assert set(report) >= {"outputs", "findings", "cpm"} and report["qdq_as_written"] is as_written
    rc = cli.main(["--onnx", str(model), "--int8", str(tmp_path / "none.onnx"), "--manifest", str(art.manifest)])
    assert rc == 1 and "model not found" in capsys.readouterr().err


def test_check_accuracy_refuses_fused_int8_where_the_kernels_saturate(calibrated, tmp_path, capsys, monkeypatch):
    pool, model, art, _ = calibrated
    cli = load_cli()
    monkeypatch.setattr(cli, "integer_kernels_saturate", lambda: True)
    rc = cli.main(["--onnx", str(model), "--int8", str(art.cpu_onnx), "--manifest", str(art.manifest), "--limit", "2"])
    assert rc == 1 and "INT8 models refused" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_phantom_frames",
                        lambda: (generate_series(3, "ge_standard", size=SIZE, n_slices=10).frames(), "small phantom"))
    rc = cli.main(["--onnx", str(model), "--int8", str(art.cpu_onnx), "--manifest", str(art.manifest), "--limit", "2",
                   "--qdq-as-written"])
    assert rc == 0 and "findings within 1 mm" in capsys.readouterr().out


def test_check_accuracy_sweep_runs_its_int8_models_as_written(calibrated, tmp_path, capsys, monkeypatch):
    pool, model, art, _ = calibrated
    cli = load_cli()
    monkeypatch.setattr(cli, "integer_kernels_saturate", lambda: True)
    monkeypatch.setattr(cli, "_phantom_frames",
                        lambda: (generate_series(3, "ge_standard", size=SIZE, n_slices=10).frames(), "small phantom"))
    opened = []
    import edge.backends.onnxruntime_runner as ort_runner

    original = ort_runner.OnnxRuntimeRunner.__init__
    monkeypatch.setattr(ort_runner.OnnxRuntimeRunner, "__init__",
                        lambda self, path, *a, **k: opened.append((Path(path).name, k.get("qdq_as_written", False)))
                        or original(self, path, *a, **k))
    out_json = tmp_path / "sweep.json"
    rc = cli.main(["--onnx", str(model), "--int8", str(art.cpu_onnx), "--manifest", str(art.manifest), "--limit", "2",
                   "--cpm-data", str(pool / "ge_standard"), "--annotations", str(pool / "ge_standard" / "annotations.csv"),
                   "--sweep-methods", "max", "--sweep-sizes", "8", "--calib-pool", str(pool), "--out", str(tmp_path / "sw"),
                   "--qdq-as-written", "--max-cpm-drop", "1", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out_json.read_text())["sweep"]
    assert [r["method"] for r in rows] == ["fp32", "max"] and rows[1]["calibration_slices"] == 8
    int8_opened = [as_written for name, as_written in opened if "int8" in name or ".max." in name]
    fp32_opened = [as_written for name, as_written in opened if name == model.name]
    assert int8_opened and all(int8_opened) and fp32_opened and not any(fp32_opened)


def test_polygraphy_runner_refuses_fused_int8_where_the_kernels_saturate(calibrated, monkeypatch):
    from edge.backends import onnxruntime_runner
    from edge.errors import InputError

    _, _, art, _ = calibrated
    monkeypatch.setattr(onnxruntime_runner, "integer_kernels_saturate", lambda: True)
    with pytest.raises(InputError, match="INT8 model refused"):
        onnxrt_runner(art.cpu_onnx, "int8").activate()
    runner = onnxrt_runner(art.cpu_onnx, "int8", qdq_as_written=True)
    runner.activate()
    runner.deactivate()
