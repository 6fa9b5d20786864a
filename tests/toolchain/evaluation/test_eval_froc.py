import math

import numpy as np
import pytest

from edge.errors import ConfigError, EdgeError
from toolchain.evaluation.froc import (
    FP_RATES,
    MISSED_PROBABILITY,
    Candidates,
    NoduleMeta,
    Nodules,
    evaluate_froc,
    froc_curve,
    match_candidates,
    nodule_groups,
    per_type_sensitivity,
    resolve_scans,
    threshold_at_fp_rate,
)


def make_nodules(rows):
    """rows: (seriesuid, (x, y, z), diameter_mm)."""
    return Nodules(tuple(r[0] for r in rows), np.array([r[1] for r in rows], float).reshape(-1, 3),
                   np.array([r[2] for r in rows], float))


def make_candidates(rows):
    """rows: (seriesuid, (x, y, z), probability)."""
    return Candidates(tuple(r[0] for r in rows), np.array([r[1] for r in rows], float).reshape(-1, 3),
                      np.array([r[2] for r in rows], float))


# Hand-computed case: 2 scans, 3 nodules, 9 candidates.
#   scan A: N1 (0,0,0) d=10 (r=5), N2 (50,0,0) d=6 (r=3); scan B: N3 (0,0,0) d=8 (r=4).
#   A: 0.9 hits N1; 0.5 hits N1 too (double hit: ignored); 0.8 FP; 0.3 hits N2 (2.9 mm < 3); 0.6 FP.
#   B: 0.6 FP; 0.6 hits N3 (3.5 mm < 4); 0.2 FP; 0.1 FP.
# FROC entries: nodules 0.9, 0.3, 0.6; FPs 0.8, 0.6, 0.6, 0.2, 0.1.
# Thresholds (desc) -> cumulative (FP, TP): 0.9 (0,1); 0.8 (1,1); 0.6 (3,2) [1 TP + 2 FPs tie: a slanted
# segment]; 0.3 (3,3); 0.2 (4,3); 0.1 (5,3). drop_intermediate removes 0.2 (collinear between 0.3 and 0.1).
# FP/scan = FP/2, sensitivity = TP/3: (0,0) (0,1/3) (0.5,1/3) (1.5,2/3) (1.5,1) (2.5,1).
#   0.125, 0.25, 0.5 -> 1/3 (flat); 1 -> 1/3 + (1-0.5)/(1.5-0.5) * (2/3-1/3) = 1/2;
#   2, 4, 8 -> 1 (4 and 8 lie beyond the curve: np.interp holds the last value).
# CPM = (3 * 1/3 + 1/2 + 3 * 1) / 7 = 4.5 / 7.
HAND_NODULES = [("A", (0, 0, 0), 10), ("A", (50, 0, 0), 6), ("B", (0, 0, 0), 8)]
HAND_CANDIDATES = [
    ("A", (1, 0, 0), 0.9), ("A", (0, 2, 0), 0.5), ("A", (100, 0, 0), 0.8), ("A", (50, 0, 2.9), 0.3),
    ("A", (0, -100, 0), 0.6), ("B", (30, 30, 30), 0.6), ("B", (0, 0, 3.5), 0.6), ("B", (-40, 0, 0), 0.2),
    ("B", (60, 0, 0), 0.1),
]


def hand_result(scans=("A", "B")):
    return evaluate_froc(make_nodules(HAND_NODULES), make_candidates(HAND_CANDIDATES), scans)


def test_hand_computed_froc_and_cpm():
    r = hand_result()
    np.testing.assert_allclose(r.curve.fps_per_scan, [0, 0, 0.5, 1.5, 1.5, 2.5])
    np.testing.assert_allclose(r.curve.sensitivity, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(r.sensitivities, [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1, 1, 1])
    assert r.cpm == pytest.approx(4.5 / 7)
    c = r.matching.counts
    assert (c["true_positives"], c["false_positives"], c["false_negatives"]) == (3, 5, 0)
    assert c["double_detections_ignored"] == 1


def test_scans_without_nodules_increase_fp_per_scan():
    # Same findings over 4 scans: FP/scan = FP/4, curve (0,0) (0,1/3) (0.25,1/3) (0.75,2/3) (0.75,1) (1.25,1).
    # 0.125, 0.25 -> 1/3; 0.5 -> 1/3 + (0.25/0.5) * 1/3 = 1/2; 1..8 -> 1. CPM = (2/3 + 1/2 + 4) / 7.
    r = hand_result(("A", "B", "C", "D"))
    np.testing.assert_allclose(r.sensitivities, [1 / 3, 1 / 3, 1 / 2, 1, 1, 1, 1])
    assert r.cpm == pytest.approx((2 / 3 + 1 / 2 + 4) / 7)
    assert r.cpm > hand_result().cpm


def test_perfect_predictions_give_cpm_one():
    nodules = make_nodules(HAND_NODULES)
    candidates = make_candidates([(u, xyz, 0.5 + 0.1 * i) for i, (u, xyz, _) in enumerate(HAND_NODULES)])
    r = evaluate_froc(nodules, candidates, ("A", "B", "C"))
    assert r.cpm == 1.0
    np.testing.assert_array_equal(r.sensitivities, np.ones(7))


def test_only_false_positives_give_cpm_zero():
    nodules = make_nodules(HAND_NODULES)
    candidates = make_candidates([("A", (200, 0, 0), 0.9), ("B", (0, 200, 0), 0.4), ("C", (0, 0, 0), 0.7)])
    r = evaluate_froc(nodules, candidates, ("A", "B", "C"))
    assert r.cpm == 0.0
    assert r.matching.counts["false_positives"] == 3


def test_no_candidates_give_cpm_zero():
    r = evaluate_froc(make_nodules(HAND_NODULES), make_candidates([]), ("A", "B"))
    assert r.cpm == 0.0
    assert r.matching.counts["false_negatives"] == 3


def test_missed_nodule_caps_sensitivity():
    # 1 scan, 2 nodules, one missed: TP 0.9, FP 0.5 -> (0,0) (0,1/2) (1,1/2): 1/2 everywhere.
    nodules = make_nodules([("A", (0, 0, 0), 10), ("A", (40, 0, 0), 10)])
    candidates = make_candidates([("A", (0, 0, 1), 0.9), ("A", (-40, 0, 0), 0.5)])
    r = evaluate_froc(nodules, candidates, ("A",))
    np.testing.assert_allclose(r.sensitivities, np.full(7, 0.5))
    assert r.matching.missed.tolist() == [False, True, False]
    assert r.matching.probability[1] == MISSED_PROBABILITY


def test_duplicate_hits_count_once_with_highest_probability():
    nodules = make_nodules([("A", (0, 0, 0), 10)])
    candidates = make_candidates([("A", (1, 0, 0), 0.2), ("A", (0, 1, 0), 0.9), ("A", (0, 0, 1), 0.5),
                                  ("A", (30, 0, 0), 0.7)])
    m = match_candidates(nodules, candidates, ("A",))
    assert m.is_nodule.tolist() == [1.0, 0.0]
    assert m.probability.tolist() == [0.9, 0.7]
    assert m.counts["double_detections_ignored"] == 2
    assert m.counts["false_positives"] == 1
    # The duplicates are neither TP nor FP: the curve equals the one without them.
    alone = make_candidates([("A", (0, 1, 0), 0.9), ("A", (30, 0, 0), 0.7)])
    np.testing.assert_array_equal(evaluate_froc(nodules, candidates, ("A",)).sensitivities,
                                  evaluate_froc(nodules, alone, ("A",)).sensitivities)


def test_hit_requires_distance_strictly_below_radius():
    # Official: dist**2 < (d/2)**2. (3,4,0) is exactly 5 mm from the centre of a 10 mm nodule: a miss.
    nodules = make_nodules([("A", (0, 0, 0), 10)])
    on_boundary = match_candidates(nodules, make_candidates([("A", (3, 4, 0), 0.9)]), ("A",))
    assert on_boundary.missed.tolist() == [True, False]
    assert on_boundary.counts["false_positives"] == 1
    inside = match_candidates(nodules, make_candidates([("A", (3, 3.999, 0), 0.9)]), ("A",))
    assert inside.counts["true_positives"] == 1 and inside.counts["false_positives"] == 0


def test_negative_diameter_reads_as_ten_mm():
    nodules = make_nodules([("A", (0, 0, 0), -1)])
    m = match_candidates(nodules, make_candidates([("A", (0, 0, 4.9), 0.9), ("A", (0, 0, 5.0), 0.8)]), ("A",))
    assert m.counts["true_positives"] == 1 and m.counts["false_positives"] == 1


def test_candidate_hitting_two_nodules_counts_for_both():
    nodules = make_nodules([("A", (0, 0, 0), 10), ("A", (4, 0, 0), 10)])
    m = match_candidates(nodules, make_candidates([("A", (2, 0, 0), 0.8)]), ("A",))
    assert m.is_nodule.tolist() == [1.0, 1.0]
    assert m.probability.tolist() == [0.8, 0.8]


def test_marks_on_excluded_findings_are_ignored_only_with_an_exclusion_list():
    nodules = make_nodules([("A", (0, 0, 0), 10)])
    excluded = make_nodules([("A", (40, 0, 0), -1)])
    candidates = make_candidates([("A", (0, 0, 0), 0.9), ("A", (41, 0, 0), 0.8), ("A", (80, 0, 0), 0.7)])
    with_list = match_candidates(nodules, candidates, ("A",), excluded=excluded)
    assert with_list.counts["irrelevant_candidates"] == 1
    assert with_list.counts["false_positives"] == 1
    without = match_candidates(nodules, candidates, ("A",))
    assert without.counts["irrelevant_candidates"] == 0
    assert without.counts["false_positives"] == 2


def test_max_marks_keeps_marks_above_the_next_highest_probability():
    # 103 marks: probabilities 1..103 / 1000; the 101st highest is 0.003, so 0.004..0.103 (100 marks) stay.
    candidates = make_candidates([("A", (1000 + i, 0, 0), (i + 1) / 1000) for i in range(103)])
    m = match_candidates(make_nodules([("A", (0, 0, 0), 10)]), candidates, ("A",), max_marks_per_scan=100)
    assert m.counts["candidates"] == 100 and m.counts["candidates_over_max_marks"] == 3
    assert m.probability[m.is_nodule == 0].min() == pytest.approx(0.004)
    unlimited = match_candidates(make_nodules([("A", (0, 0, 0), 10)]), candidates, ("A",), max_marks_per_scan=None)
    assert unlimited.counts["candidates"] == 103


def test_series_outside_the_scan_list_are_ignored():
    r = evaluate_froc(make_nodules(HAND_NODULES), make_candidates(HAND_CANDIDATES), ("A",))
    assert r.matching.counts["nodules"] == 2
    assert r.matching.counts["candidates_outside_scans"] == 4
    assert r.matching.counts["nodules_outside_scans"] == 1


def test_no_nodules_is_a_user_error():
    with pytest.raises(EdgeError, match="no annotated nodule"):
        evaluate_froc(make_nodules([]), make_candidates([("A", (0, 0, 0), 0.5)]), ("A",))


def test_resolve_scans():
    nodules, candidates = make_nodules(HAND_NODULES), make_candidates(HAND_CANDIDATES + [("C", (0, 0, 0), 0.1)])
    scans, note = resolve_scans(nodules, candidates)
    assert scans == ("A", "B", "C") and "union" in note
    scans, _ = resolve_scans(nodules, candidates, n_scans=5)
    assert len(scans) == 5 and scans[:3] == ("A", "B", "C")
    scans, _ = resolve_scans(nodules, candidates, series_uids=["B", "A", "B"])
    assert scans == ("B", "A")
    with pytest.raises(ConfigError, match="--scans 2"):
        resolve_scans(nodules, candidates, n_scans=2)


def test_threshold_at_fp_rate_and_per_type_sensitivity():
    r = hand_result()
    # 1 FP/scan over 2 scans allows 2 FPs; FPs by probability 0.8, 0.6, 0.6, ...: accepting 0.6 gives 3 FPs,
    # so the threshold is 0.8 and only N1 (0.9) is detected. 4 FP/scan allows 8 >= 5 FPs: accept all (0.1).
    assert threshold_at_fp_rate(r.matching, 1.0) == 0.8
    assert threshold_at_fp_rate(r.matching, 4.0) == 0.1
    assert threshold_at_fp_rate(r.matching, 0.125) == 0.9
    meta = NoduleMeta(("solid", "ground_glass", "solid"), ("central", "juxta_pleural", "juxta_pleural"),
                      np.array([10.0, 5.0, np.nan]))
    groups = nodule_groups(make_nodules(HAND_NODULES), meta)
    assert sorted(groups) == sorted(["all", "size:<6mm", "size:>=6mm", "type:ground_glass", "type:solid",
                                     "location:central", "location:juxta_pleural"])
    assert groups["size:<6mm"].tolist() == [False, True, False]  # meta diameter 5 wins over the annotated 6
    out = per_type_sensitivity(r.matching, groups, {"1 FP/scan": 0.8, "p>=0.5": 0.5})
    assert out["all"]["1 FP/scan"]["sensitivity"] == pytest.approx(1 / 3)
    assert out["type:solid"]["p>=0.5"] == {"threshold": 0.5, "detected": 2, "nodules": 2, "sensitivity": 1.0}
    assert out["type:ground_glass"]["p>=0.5"]["sensitivity"] == 0.0
    assert out["location:juxta_pleural"]["p>=0.5"]["detected"] == 1


def _official_reference(nodules, candidates, scans, excluded):
    """Plain-loop transcription of the official evaluateCAD matching and an unreduced FROC staircase."""
    gt, prob, excl = [], [], []
    for uid in scans:
        cands = {i: (candidates.centers[i], candidates.probabilities[i])
                 for i, u in enumerate(candidates.seriesuids) if u == uid}
        cands2 = dict(cands)
        annots = [(nodules.centers[i], nodules.diameters[i], "Included")
                  for i, u in enumerate(nodules.seriesuids) if u == uid]
        annots += [(excluded.centers[i], excluded.diameters[i], "Excluded")
                   for i, u in enumerate(excluded.seriesuids) if u == uid]
        for center, diameter, state in annots:
            diameter = 10.0 if diameter < 0 else diameter
            r2 = math.pow(diameter / 2.0, 2.0)
            matches = []
            for key, (c, p) in cands.items():
                dist = sum(math.pow(float(center[k]) - float(c[k]), 2.0) for k in range(3))
                if dist < r2:
                    if state == "Included":
                        matches.append(p)
                        cands2.pop(key, None)
                    elif key in cands2:
                        del cands2[key]
            if state == "Included":
                gt.append(1.0)
                prob.append(max(matches) if matches else MISSED_PROBABILITY)
                excl.append(not matches)
        for _, p in cands2.values():
            gt.append(0.0)
            prob.append(p)
            excl.append(False)
    gt, prob, excl = np.array(gt), np.array(prob), np.array(excl, bool)
    total = gt.sum()
    n_false = np.sum(gt == 0)
    scores = np.unique(prob[~excl])[::-1]
    xs, ys = [0.0], [0.0]
    for t in scores:
        accepted = ~excl & (prob >= t)
        fp = np.sum(accepted & (gt == 0))
        # The official arithmetic, fpr * FP / scans, so that vertical steps sit at bit-identical x.
        xs.append((fp / n_false) * n_false / len(scans) if n_false else 0.0)
        ys.append(np.sum(accepted & (gt == 1)) / total)
    return gt, prob, excl, np.array(xs), np.array(ys)


def test_matches_a_plain_transcription_of_the_official_script_on_random_data():
    rng = np.random.default_rng(7)
    for trial in range(40):
        n_scans = int(rng.integers(1, 5))
        scans = tuple(f"s{i}" for i in range(n_scans))
        n_nod, n_exc, n_cand = int(rng.integers(1, 6)), int(rng.integers(0, 3)), int(rng.integers(0, 25))
        nodules = Nodules(tuple(rng.choice(scans, n_nod)), rng.uniform(-20, 20, (n_nod, 3)),
                          rng.choice([4.0, 8.0, 12.0, -1.0], n_nod))
        if not any(u in scans for u in nodules.seriesuids):
            continue
        excluded = Nodules(tuple(rng.choice(scans, n_exc)), rng.uniform(-20, 20, (n_exc, 3)), np.full(n_exc, -1.0))
        # Coarse probabilities so that ties between TPs and FPs happen.
        candidates = Candidates(tuple(rng.choice(scans, n_cand)), rng.uniform(-20, 20, (n_cand, 3)),
                                rng.integers(0, 6, n_cand) / 5.0)
        r = evaluate_froc(nodules, candidates, scans, excluded=excluded, max_marks_per_scan=None)
        gt, prob, excl, xs, ys = _official_reference(nodules, candidates, scans, excluded)
        np.testing.assert_array_equal(r.matching.is_nodule, gt, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(r.matching.probability, prob, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(r.matching.missed, excl, err_msg=f"trial {trial}")
        probe = np.concatenate([FP_RATES, rng.uniform(0, 10, 50), xs])
        if np.sum(gt[~excl]) == 0:
            expected = np.zeros(len(probe))
        else:
            expected = np.interp(probe, xs, ys)
        np.testing.assert_allclose(r.curve.sensitivity_at(probe), expected, atol=1e-12, err_msg=f"trial {trial}")


def test_froc_curve_without_false_positives_is_flat_at_detected_fraction():
    # Official border case: no FP at all -> FP/scan is 0 for every point.
    curve = froc_curve([1.0, 1.0, 1.0], [0.9, 0.4, MISSED_PROBABILITY], [False, False, True], 3)
    np.testing.assert_array_equal(curve.fps_per_scan, np.zeros(3))
    np.testing.assert_allclose(curve.sensitivity_at(), np.full(7, 2 / 3))
