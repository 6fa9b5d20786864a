import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calib.ranges import (
    ActivationCollector,
    TensorHistogram,
    activation_tensors,
    compute_ranges,
    entropy_threshold,
    kl_divergence_curve,
    load_histograms,
    mse_threshold,
    percentile_threshold,
    read_ranges,
    save_histograms,
    scale_from_amax,
    write_ranges,
)
from edge.errors import ConfigError, InputError


def test_kl_curve_matches_a_case_worked_by_hand():
    # counts [6, 2, 1, 1], 2 quantized levels, thresholds after 2, 3 and 4 bins:
    # i=2: P = [6, 2+1+1]/10, Q = [6, 2]/8                       -> 0.6 ln(.6/.75) + .4 ln(.4/.25)
    # i=3: P = [6, 2, 1+1]/10, levels [6] and [2+1 over bins 1, 2] -> Q = [6, 1.5, 1.5]/9
    # i=4: P = [6, 2, 1, 1]/10, levels [6+2 over 0,1] [1+1 over 2,3] -> Q = [4, 4, 1, 1]/10
    expected = {
        2: 0.6 * math.log(0.6 / 0.75) + 0.4 * math.log(0.4 / 0.25),
        3: 0.6 * math.log(0.6 / (6 / 9)) + 2 * 0.2 * math.log(0.2 / (1.5 / 9)),
        4: 0.6 * math.log(0.6 / 0.4) + 0.2 * math.log(0.2 / 0.4),
    }
    curve = kl_divergence_curve(np.array([6, 2, 1, 1]), num_quantized_bins=2)
    assert np.isnan(curve[:2]).all()
    for i, d in expected.items():
        assert curve[i] == pytest.approx(d, rel=1e-12)
    # TensorRT's threshold is (m + 0.5) bin widths for the minimising m (here 3)
    assert entropy_threshold(np.array([6, 2, 1, 1]), 0.5, num_quantized_bins=2) == pytest.approx(3.5 * 0.5)


def test_entropy_keeps_the_whole_range_of_uniform_data_and_clips_a_long_tail():
    uniform = np.zeros(2048)
    uniform[:1000] = 50
    # every threshold from 1000 bins on quantizes a flat histogram without loss: the first is chosen
    assert entropy_threshold(uniform, 1.0) == pytest.approx(1000.5)
    rng = np.random.default_rng(0)
    x = np.abs(rng.laplace(size=400_000))
    counts = np.bincount(np.minimum((x * 2048 / x.max()).astype(int), 2047), minlength=2048)
    t = entropy_threshold(counts, x.max() / 2048)
    assert np.quantile(x, 0.999) < t < x.max()


def test_kl_curve_is_infinite_where_only_outliers_remain():
    counts = np.zeros(8)
    counts[:2] = 10
    counts[7] = 1
    curve = kl_divergence_curve(counts, num_quantized_bins=2)
    assert np.isinf(curve[4])  # the last level holds only clipped outliers: Q is 0 where P is not
    assert np.isfinite(curve[8])


def test_percentile_is_the_upper_edge_of_the_bin_reaching_it():
    counts = np.array([50, 30, 15, 4, 1])
    assert percentile_threshold(counts, 2.0, 50.0) == pytest.approx(2.0)
    assert percentile_threshold(counts, 2.0, 95.0) == pytest.approx(6.0)
    assert percentile_threshold(counts, 2.0, 99.5) == pytest.approx(10.0)
    assert percentile_threshold(counts, 2.0, 100.0) == pytest.approx(10.0)
    with pytest.raises(ConfigError, match="percentile"):
        percentile_threshold(counts, 2.0, 0.0)


def test_mse_threshold_trades_clipping_for_resolution():
    uniform = np.full(512, 100.0)
    # quantization error of uniform data grows with clipping faster than resolution gains: keep the range
    assert mse_threshold(uniform, 1.0) >= 0.95 * 512
    spiky = np.zeros(512)
    spiky[:64] = 1e6
    spiky[511] = 1.0  # one far outlier among 64 million values
    t = mse_threshold(spiky, 1.0)
    assert 64 <= t < 128  # clipping the outlier costs less than the resolution lost by keeping it
    spiky[511] = 1e6  # a real second mode: clipping it would cost far more
    assert mse_threshold(spiky, 1.0) > 400


def test_method_dispatch_and_zero_range():
    h = TensorHistogram("t", np.array([0, 4, 4, 0, 0, 0, 0, 1]), absmax=8.0, size=9)
    ranges = {m: compute_ranges({"t": h}, m)["t"] for m in ("max", "percentile", "entropy", "mse")}
    assert ranges["max"] == 8.0
    assert all(0 < v <= 8.0 for v in ranges.values())
    with pytest.raises(ConfigError, match="one of max, percentile, entropy, mse"):
        compute_ranges({"t": h}, "minmax")
    assert scale_from_amax(0.0) == scale_from_amax(float("nan")) == pytest.approx(1.0 / 127)
    assert scale_from_amax(12.7) == pytest.approx(0.1)


def _relu_scale_model(path):
    """y = relu(x) * 3: activations input, relu output and y with known ranges."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    three = helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("Mul", ["r", "three"], ["y"], name="mul")],
                              "g", [x], [y], [three])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_collector_histograms_every_activation_in_two_passes(tmp_path):
    path = _relu_scale_model(tmp_path / "m.onnx")
    assert activation_tensors(onnx.load(str(path))) == ["x", "r", "y"]
    batches = [np.array([[-4.0, 1.0, 2.0, 0.5]], np.float32), np.array([[1.0, -0.5, 0.25, 3.0]], np.float32)]
    calls = []

    def source():
        calls.append(1)
        return iter(batches)

    hist = ActivationCollector(path, bins=8).collect(source)
    assert len(calls) == 2
    assert hist["x"].absmax == 4.0 and hist["r"].absmax == 3.0 and hist["y"].absmax == 9.0
    assert hist["x"].size == 8 and hist["x"].counts.sum() == 8
    # |x| = 4 1 2 .5 1 .5 .25 3 in 8 bins of width 0.5 (the maximum goes to the last bin)
    assert hist["x"].counts.tolist() == [1, 2, 2, 0, 1, 0, 1, 1]
    assert hist["r"].counts[0] == 3  # the two negatives and 0.25 -> bin 0 of width 0.375
    with pytest.raises(InputError, match="no float activation"):
        ActivationCollector(path, tensors=["nope"])


def test_collector_refuses_an_empty_calibration_set(tmp_path):
    path = _relu_scale_model(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="empty"):
        ActivationCollector(path).collect(lambda: iter([]))


def test_histograms_and_ranges_round_trip(tmp_path):
    h = {"a": TensorHistogram("a", np.arange(16, dtype=np.int64), 3.5, 120),
         "b/c:0": TensorHistogram("b/c:0", np.zeros(16, np.int64), 0.0, 0)}
    save_histograms(tmp_path / "h.npz", h)
    back = load_histograms(tmp_path / "h.npz")
    assert list(back) == ["a", "b/c:0"]
    assert back["a"].counts.tolist() == list(range(16)) and back["a"].absmax == 3.5 and back["a"].size == 120
    write_ranges(tmp_path / "r.json", {"a": 1.25, "b/c:0": 0.0}, "percentile", 99.9)
    assert read_ranges(tmp_path / "r.json") == {"a": 1.25, "b/c:0": 0.0}
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(InputError, match="not a ranges file"):
        read_ranges(tmp_path / "bad.json")
