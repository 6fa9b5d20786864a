"""Tests for toolchain.evaluation.rescorer_fit: labels, the Newton logistic fit and cross-validated CPM."""

import numpy as np
import pytest

from edge.decode.findings import Finding
from edge.decode.rescoring import FEATURE_NAMES
from edge.errors import ConfigError
from toolchain.evaluation.froc import Nodules
from toolchain.evaluation.rescorer_fit import (cross_validated_cpm, finding_labels, findings_cpm, fit_logistic,
                                               fit_rescorer, rescored_cpm, threshold_at)


def finding(x, score, extent, diameter=10.0, spacing=1.0, drift=0.0):
    return Finding(x=x, y=0.0, z=0.0, diameter_mm=diameter, probability=score, max_score=score, n_slices=3,
                   z_extent_mm=extent, first_slice_location=-extent / 2, last_slice_location=extent / 2,
                   key_slice_location=0.0, slice_spacing_mm=spacing, mean_score=score, drift_mm=drift)


def test_labels_follow_the_luna16_hit_rule():
    nodules = Nodules(("a",), np.array([[0.0, 0.0, 0.0]]), np.array([10.0]))
    found = {"a": [finding(4.99, 0.5, 8.0), finding(5.0, 0.5, 8.0)], "b": [finding(0.0, 0.5, 8.0)]}
    x, y = finding_labels(found, nodules)
    assert x.shape == (3, len(FEATURE_NAMES))
    assert y.tolist() == [1.0, 0.0, 0.0]  # strictly within d/2; another series' finding never hits


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40000, 2))
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.5)))
    y = (rng.random(len(p)) < p).astype(float)
    w, b = fit_logistic(x, y, l2=0.0)
    np.testing.assert_allclose(w, [2.0, -1.0], atol=0.06)
    assert b == pytest.approx(0.5, abs=0.05)
    w_reg, _ = fit_logistic(x, y, l2=1e4)
    assert np.all(np.abs(w_reg) < np.abs(w))  # the penalty shrinks the weights


def _vessel_world(n_series=20, seed=0):
    """Per series one nodule (depth ~ its width, score 0.6) and two vessels (long, score 0.9)."""
    rng = np.random.default_rng(seed)
    uids, centres, found = [], [], {}
    for s in range(n_series):
        uid = f"1.2.{s}"
        uids.append(uid)
        centres.append([0.0, 0.0, 0.0])
        found[uid] = [finding(rng.normal(0, 0.5), 0.6 + rng.normal(0, 0.02), 9.0 + rng.normal(0, 1)),
                      finding(50.0, 0.9, 40.0 + rng.normal(0, 5), drift=10.0),
                      finding(-50.0, 0.85, 35.0 + rng.normal(0, 5), drift=8.0)]
    nodules = Nodules(tuple(uids), np.array(centres), np.full(n_series, 10.0))
    return found, nodules, tuple(uids)


def test_fitted_rescorer_demotes_vessels_and_cross_validation_shows_it():
    found, nodules, scans = _vessel_world()
    x, y = finding_labels(found, nodules)
    model = fit_rescorer(x, y, l2=1.0)
    assert model.features == FEATURE_NAMES
    probs = model.probabilities(x)
    assert probs[y == 1].min() > probs[y == 0].max()
    assert rescored_cpm(found, nodules, scans, model) == pytest.approx(1.0)
    (cv,) = cross_validated_cpm([found], [nodules], [scans], l2=1.0, folds=4)
    assert cv == pytest.approx(1.0)
    # the raw scores rank both vessels of every series first: 2 FP/scan before the first nodule
    raw = findings_cpm(found, {u: np.array([f.max_score for f in fs]) for u, fs in found.items()}, nodules, scans)
    assert raw < 0.5


def test_fit_rescorer_refuses_data_without_both_classes():
    found, nodules, _ = _vessel_world(3)
    x, y = finding_labels(found, nodules)
    with pytest.raises(ConfigError, match="nodule hit"):
        fit_rescorer(x, np.zeros_like(y))
    with pytest.raises(ConfigError, match="2 folds"):
        cross_validated_cpm([found], [nodules], [()], l2=1.0, folds=1)


def test_report_threshold_pools_the_folders():
    a = {"1.1": [finding(0.0, 0.9, 8.0), finding(60.0, 0.8, 8.0)]}  # nodule 0.9, FP 0.8
    b = {"2.1": [finding(0.0, 0.5, 8.0), finding(60.0, 0.7, 8.0)]}  # nodule 0.5, FP 0.7
    nod_a = Nodules(("1.1",), np.zeros((1, 3)), np.array([10.0]))
    nod_b = Nodules(("2.1",), np.zeros((1, 3)), np.array([10.0]))
    probs = [{"1.1": np.array([0.9, 0.8])}, {"2.1": np.array([0.5, 0.7])}]
    args = ([a, b], probs, [nod_a, nod_b], [("1.1",), ("2.1",)])
    assert threshold_at(*args, fp_per_scan=0.5) == pytest.approx(0.8)  # one FP in two scans
    assert threshold_at(*args, fp_per_scan=1.0) == pytest.approx(0.5)  # both FPs fit: every mark
    assert threshold_at(*args, fp_per_scan=0.25) == pytest.approx(0.9)  # no FP: only the marks above 0.8
