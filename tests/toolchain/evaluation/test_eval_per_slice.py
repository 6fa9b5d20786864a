import numpy as np
import pytest

from edge.errors import InputError
from toolchain.evaluation.froc import Candidates, Nodules
from toolchain.evaluation.per_slice import per_slice_metrics

# Two scans, images every 2 mm at z = -6 .. 6 (7 each, 14 in all).
SLICES = {"A": np.arange(-6.0, 7.0, 2.0), "B": np.arange(-6.0, 7.0, 2.0)}
# A: N1 (0,0,0) r=5 cuts z=-4..4 (5 lesion-slices; |z|=6 >= 5); N2 (50,0,0) r=3 cuts -2, 0, 2 (3).
# B: N3 (0,0,0) r=4 cuts -2, 0, 2 (3): z = +-4 is exactly on the radius, not strictly inside. Total 11.
NODULES = Nodules(("A", "A", "B"), np.array([[0.0, 0, 0], [50, 0, 0], [0, 0, 0]]), np.array([10.0, 6, 8]))


def findings(rows):
    return Candidates(tuple(r[0] for r in rows), np.array([r[1] for r in rows], float).reshape(-1, 3),
                      np.array([r[2] for r in rows], float))


def test_hand_computed_per_slice_metrics():
    f = findings([
        ("A", (0, 0, 0), 0.9),      # N1 @ z=0
        ("A", (1, 0, 0), 0.8),      # N1 @ z=0 again: duplicate, neither TP nor FP
        ("A", (0, 2, 2.02), 0.9),   # N1 @ z=2 (snapped from 2.02 mm, within tolerance)
        ("A", (20, 20, 2), 0.9),    # FP on A z=2
        ("A", (25, 20, 2), 0.7),    # second FP on A z=2
        ("A", (50, 0, 2), 0.3),     # N2 @ z=2 but below the threshold: ignored
        ("B", (0, 3.5, 2), 0.6),    # distance sqrt(3.5**2 + 2**2) = 4.03 >= r=4: FP on B z=2
        ("B", (0, 0, -2), 0.6),     # N3 @ z=-2
    ])
    m = per_slice_metrics(NODULES, f, SLICES, threshold=0.5)
    assert (m.images, m.lesion_slices, m.detected_lesion_slices) == (14, 11, 3)
    assert m.sensitivity == pytest.approx(3 / 11)
    assert m.false_positives == 3
    assert m.fp_per_image == pytest.approx(3 / 14)
    assert m.max_fp_on_one_image == 2 and m.images_over_fp_limit == 1
    assert not m.meets_criteria


def test_criteria_met_with_every_lesion_slice_found():
    rows = []
    for n, (uid, center, diameter) in enumerate(zip(NODULES.seriesuids, NODULES.centers, NODULES.diameters)):
        for z in SLICES[uid]:
            if (z - center[2]) ** 2 < (diameter / 2) ** 2:
                rows.append((uid, (center[0], center[1], z), 0.9))
    rows += [("A", (90, 90, z), 0.9) for z in SLICES["A"]]  # exactly one FP on each image of scan A
    m = per_slice_metrics(NODULES, findings(rows), SLICES, threshold=0.5)
    assert m.sensitivity == 1.0
    assert m.fp_per_image == pytest.approx(0.5) and m.max_fp_on_one_image == 1
    assert m.images_over_fp_limit == 0
    assert m.meets_criteria
    assert per_slice_metrics(NODULES, findings(rows), SLICES, threshold=0.95).sensitivity == 0.0


def test_finding_off_every_image_is_an_input_error():
    with pytest.raises(InputError, match="slices.csv.*coordZ 1 mm"):
        per_slice_metrics(NODULES, findings([("A", (0, 0, 1), 0.9)]), SLICES, 0.5, findings_source="slices.csv")


def test_scans_outside_the_slice_table_are_ignored_and_counted():
    m = per_slice_metrics(NODULES, findings([("B", (0, 0, 0), 0.9), ("C", (0, 0, 0), 0.9)]),
                          {"B": SLICES["B"]}, 0.5)
    assert (m.scans, m.images, m.lesion_slices, m.detected_lesion_slices) == (1, 7, 3, 1)
    assert (m.ignored_nodules, m.ignored_findings) == (2, 1)


def test_single_image_scan_and_no_lesions():
    m = per_slice_metrics(Nodules((), np.zeros((0, 3)), np.zeros(0)), findings([("X", (0, 0, 5.05), 0.9)]),
                          {"X": np.array([5.0])}, 0.5)
    assert m.sensitivity is None and m.false_positives == 1 and m.fp_per_image == 1.0
    assert not m.meets_criteria
