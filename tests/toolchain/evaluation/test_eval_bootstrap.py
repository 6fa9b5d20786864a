import time

import numpy as np
import pytest

from edge.errors import ConfigError
from toolchain.evaluation.bootstrap import _order_statistic_bounds, bootstrap_froc
from toolchain.evaluation.froc import Candidates, Nodules, evaluate_froc


def synthetic(n_scans=30, seed=3):
    """Each scan: 0-2 nodules, each found with prob ~U(0.3, 1) w.p. 0.8; 0-6 FPs with prob ~U(0, 0.8)."""
    rng = np.random.default_rng(seed)
    n_uids, n_centers, n_diams, c_uids, c_centers, c_probs = [], [], [], [], [], []
    for s in range(n_scans):
        uid = f"scan{s}"
        for k in range(int(rng.integers(0, 3))):
            center = np.array([40.0 * k, 0.0, 0.0])
            n_uids.append(uid)
            n_centers.append(center)
            n_diams.append(float(rng.uniform(4, 20)))
            if rng.random() < 0.8:
                c_uids.append(uid)
                c_centers.append(center + 0.5)
                c_probs.append(float(rng.uniform(0.3, 1.0)))
        for _ in range(int(rng.integers(0, 7))):
            c_uids.append(uid)
            c_centers.append(np.array([0.0, 200.0, 0.0]) + rng.uniform(-50, 50, 3))
            c_probs.append(float(rng.uniform(0.0, 0.8)))
    nodules = Nodules(tuple(n_uids), np.array(n_centers).reshape(-1, 3), np.array(n_diams))
    candidates = Candidates(tuple(c_uids), np.array(c_centers).reshape(-1, 3), np.array(c_probs))
    return evaluate_froc(nodules, candidates, tuple(f"scan{s}" for s in range(n_scans)))


def test_ci_contains_point_estimate_and_is_ordered():
    froc = synthetic()
    b = bootstrap_froc(froc.matching, samples=500, seed=0)
    assert b.samples == b.requested == 500
    assert b.cpm_lower <= froc.cpm <= b.cpm_upper
    assert b.cpm_lower < b.cpm_upper
    assert np.all(b.sensitivity_lower <= froc.sensitivities + 1e-12)
    assert np.all(froc.sensitivities <= b.sensitivity_upper + 1e-12)
    assert np.all(b.band_lower <= b.band_mean) and np.all(b.band_mean <= b.band_upper)


def test_bootstrap_is_deterministic_with_seed():
    froc = synthetic()
    a = bootstrap_froc(froc.matching, samples=200, seed=11)
    b = bootstrap_froc(froc.matching, samples=200, seed=11)
    c = bootstrap_froc(froc.matching, samples=200, seed=12)
    assert (a.cpm_lower, a.cpm_mean, a.cpm_upper) == (b.cpm_lower, b.cpm_mean, b.cpm_upper)
    np.testing.assert_array_equal(a.band_mean, b.band_mean)
    assert a.cpm_mean != c.cpm_mean


def test_identical_scans_give_a_zero_width_interval():
    # Every scan holds the same nodule hit at 0.9 and the same FP at 0.5: every resample equals the original
    # (the FP/scan divisor stays the number of scans), so the interval collapses onto the point estimate.
    uids = tuple(f"s{i}" for i in range(6))
    nodules = Nodules(uids, np.zeros((6, 3)), np.full(6, 10.0))
    candidates = Candidates(uids * 2, np.r_[np.zeros((6, 3)), np.full((6, 3), 50.0)], np.r_[np.full(6, 0.9),
                                                                                            np.full(6, 0.5)])
    froc = evaluate_froc(nodules, candidates, uids)
    b = bootstrap_froc(froc.matching, samples=50, seed=0)
    assert b.cpm_lower == pytest.approx(froc.cpm) and b.cpm_upper == pytest.approx(froc.cpm)


def test_order_statistic_bounds_match_the_official_rule():
    values = np.arange(1000.0)[::-1].reshape(-1, 1)
    mean, lower, upper = _order_statistic_bounds(values, 0.95)
    assert (float(mean[0]), float(lower[0]), float(upper[0])) == (499.5, 25.0, 975.0)


def test_samples_without_nodules_are_left_out():
    # One scan with the nodule, three without: about (3/4)**4 = 32 % of the samples draw no nodule.
    nodules = Nodules(("a",), np.zeros((1, 3)), np.array([10.0]))
    candidates = Candidates(("a", "b"), np.array([[0.0, 0, 0], [0, 0, 0]]), np.array([0.9, 0.8]))
    froc = evaluate_froc(nodules, candidates, ("a", "b", "c", "d"))
    b = bootstrap_froc(froc.matching, samples=400, seed=1)
    assert 0.2 * 400 < b.requested - b.samples < 0.45 * 400
    assert np.isfinite(b.cpm_mean)


def test_bad_settings_raise_config_error():
    froc = synthetic(5)
    with pytest.raises(ConfigError):
        bootstrap_froc(froc.matching, samples=0)
    with pytest.raises(ConfigError):
        bootstrap_froc(froc.matching, samples=10, confidence=1.0)


def test_thousand_samples_are_fast():
    froc = synthetic(100)
    t0 = time.perf_counter()
    bootstrap_froc(froc.matching, samples=1000, seed=0)
    assert time.perf_counter() - t0 < 10.0
