from dataclasses import replace

import numpy as np
import pytest

from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
from edge.decode.peaks import extract_peaks_batch
from edge.decode.spec import DecodeSpec
from edge.errors import InputError
from edge.update.errors import GoldenCheckError
from edge.update.golden import GoldenVectors, check_golden, compare_golden, make_golden, phantom_inputs, run_model
from edge.update.manifest import GoldenSpec
from update_helpers import golden_inputs, tiny_specs

DECODE = DecodeSpec(stride=2, score_threshold=0.3, max_detections_per_slice=4, nms_kernel=3)
TOL = GoldenSpec("payload/golden.npz", heatmap_atol=0.05, score_atol=0.05, position_px=1.5, diameter_rel=0.2)


def maps(peaks, n=1, h=16, w=16):
    """Synthetic outputs: one sharp peak per (input, i, j, score, size, dy, dx)."""
    hm = np.full((n, 1, h, w), 0.01, np.float32)
    size = np.zeros((n, 1, h, w), np.float32)
    off = np.zeros((n, 2, h, w), np.float32)
    for b, i, j, s, d, dy, dx in peaks:
        hm[b, 0, i, j] = s
        size[b, 0, i, j] = d
        off[b, :, i, j] = dy, dx
    return {"heatmap": hm, "size": size, "offset": off}


def golden_of(outputs) -> GoldenVectors:
    n = outputs["heatmap"].shape[0]
    peaks = extract_peaks_batch(outputs["heatmap"], outputs["size"], outputs["offset"], DECODE)
    return GoldenVectors(np.zeros((n, 3, 32, 32), np.float32), outputs, peaks)


def test_identical_outputs_pass_and_count_findings():
    out = maps([(0, 3, 3, 0.9, 6.0, 0.1, -0.2), (0, 10, 12, 0.6, 3.0, 0, 0), (1, 5, 5, 0.31, 2.0, 0, 0)], n=2)
    report = compare_golden(out, golden_of(out), DECODE, TOL)
    assert report.passed and report.heatmap_max_abs_diff == 0
    assert (report.peaks_required, report.peaks_matched) == (2, 2)  # the 0.31 peak is within score_atol of 0.3


@pytest.mark.parametrize("change, problem", [
    (lambda o: o["heatmap"].__setitem__((0, 0, 3, 3), 0.8), "heatmap max abs diff 0.1"),
    (lambda o: o["offset"].__setitem__((0, 0, 3, 3), 1.0), "missing or off"),  # 2 px away at stride 2
    (lambda o: o["size"].__setitem__((0, 0, 3, 3), 8.0), "missing or off"),  # diameter +33 %
    (lambda o: o["heatmap"].__setitem__((0, 0, 3, 3), 0.01), "missing or off"),
    (lambda o: (o["heatmap"].__setitem__((0, 0, 14, 1), 0.7)), "unexpected finding at (28.5, 2.5)"),
])
def test_differences_beyond_tolerance_fail(change, problem):
    want = maps([(0, 3, 3, 0.9, 6.0, 0.1, -0.2)])
    got = {k: v.copy() for k, v in want.items()}
    change(got)
    tol = TOL if "heatmap" in problem else replace(TOL, heatmap_atol=1.0)  # isolate the findings check
    report = compare_golden(got, golden_of(want), DECODE, tol)
    assert not report.passed
    assert any(problem in p for p in report.problems), report.problems


def test_small_differences_and_borderline_findings_pass():
    want = maps([(0, 3, 3, 0.9, 6.0, 0.1, -0.2), (0, 9, 9, 0.33, 2.0, 0, 0)])
    got = {k: v.copy() for k, v in want.items()}
    got["heatmap"][0, 0, 3, 3] = 0.87
    got["offset"][0, :, 3, 3] = 0.4, 0.2  # 0.8 px
    got["size"][0, 0, 3, 3] = 6.9
    got["heatmap"][0, 0, 9, 9] = 0.29  # borderline peak vanishes
    report = compare_golden(got, golden_of(want), DECODE, TOL)
    assert report.passed, report.problems


def test_truncated_peak_lists_only_require_clear_winners():
    # five equal peaks, max_detections 4: which four survive is arbitrary
    peaks = [(0, 2 + 3 * k, 2, 0.5, 2.0, 0, 0) for k in range(5)] + [(0, 8, 12, 0.95, 4.0, 0, 0)]
    want = maps(peaks)
    got = {k: v.copy() for k, v in want.items()}
    got["heatmap"][0, 0, 2, 2] = 0.499  # a different subset of the ties is kept
    report = compare_golden(got, golden_of(want), DECODE, TOL)
    assert report.passed and report.peaks_required == 1


def test_npz_round_trip_and_malformed_files(tmp_path):
    out = maps([(0, 3, 3, 0.9, 6.0, 0, 0), (1, 4, 4, 0.8, 6.0, 0, 0), (1, 12, 12, 0.7, 6.0, 0, 0)], n=3)
    g = golden_of(out)
    g.save(tmp_path / "g.npz")
    back = GoldenVectors.load(tmp_path / "g.npz")
    assert [len(p) for p in back.peaks] == [1, 2, 0]
    assert compare_golden(back.outputs, back, DECODE, TOL).passed
    for bad in (b"", b"junk" * 10):
        (tmp_path / "bad.npz").write_bytes(bad)
        with pytest.raises(InputError, match="not a readable .npz"):
            GoldenVectors.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "lack.npz", input=g.inputs)
    with pytest.raises(InputError, match="lack array"):
        GoldenVectors.load(tmp_path / "lack.npz")
    np.savez(tmp_path / "obj.npz", input=np.array([object()]), peaks=np.zeros(1), peak_count=np.zeros(1),
             heatmap=np.zeros(1), size=np.zeros(1), offset=np.zeros(1))
    with pytest.raises(InputError, match="not a readable .npz"):
        GoldenVectors.load(tmp_path / "obj.npz")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from update_helpers import export_tiny

    return export_tiny(tmp_path_factory.mktemp("golden") / "m.onnx", seed=0)


def test_golden_check_on_an_exported_model(model, tmp_path):
    specs = tiny_specs()
    with OnnxRuntimeRunner(model) as runner:
        golden = make_golden(runner, specs.decode, golden_inputs(3))
        assert run_model(runner, golden.inputs)["heatmap"].shape == (3, 1, 16, 16)
    tol = GoldenSpec("payload/golden.npz", heatmap_atol=1e-5, score_atol=0.005)
    report = check_golden(lambda: OnnxRuntimeRunner(model), golden, specs.decode, tol)
    assert report.peaks_required > 0 and report.peaks_matched == report.peaks_required
    golden.outputs["heatmap"][1] += 0.02
    with pytest.raises(GoldenCheckError, match="heatmap max abs diff 0.02"):
        check_golden(lambda: OnnxRuntimeRunner(model), golden, specs.decode, tol, source="7-1.0.0")


def test_phantom_inputs_are_preprocessed_slices_through_nodules():
    spec = tiny_specs().preprocess
    x = phantom_inputs(spec, count=2, seed=3, size=64)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.std() > 0.1
