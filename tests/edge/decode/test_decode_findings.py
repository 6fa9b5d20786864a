"""Tests for edge.decode.findings: streaming 3-D aggregation of per-slice detections."""

import json

import numpy as np
import pytest

from edge.decode.findings import Finding, SeriesFindingAggregator
from edge.decode.peaks import SliceDetection
from edge.decode.spec import DecodeSpec
from edge.errors import ConfigError

SPACING = 1.5  # mm between slices


def det(x, y, loc, diameter=6.0, score=0.8):
    """A detection on an axial slice (normal +z, so z == slice location)."""
    return SliceDetection(x=x, y=y, z=loc, diameter_mm=diameter, score=score, slice_location=loc, row=0.0, col=0.0)


def sphere_slices(centre, radius, locations, score=0.9):
    """Per slice location, the detections of a sphere: the disc through it, scored by its size."""
    out = {}
    for loc in locations:
        dz = loc - centre[2]
        if abs(dz) < radius:
            r = np.sqrt(radius**2 - dz**2)
            out[loc] = [det(centre[0], centre[1], loc, 2 * r, score * r / radius)]
    return out


def run(spec, locations, per_slice):
    """Feed every location in order; return [(index of the add_slice that emitted it, finding)], flush last."""
    agg = SeriesFindingAggregator(spec)
    emitted = []
    for n, loc in enumerate(locations):
        emitted += [(n, f) for f in agg.add_slice(loc, per_slice.get(loc, []))]
    emitted += [(len(locations), f) for f in agg.flush()]
    return emitted


def merge(*dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out.setdefault(k, []).extend(v)
    return out


def locations(n, start=0.0, step=SPACING):
    return [start + k * step for k in range(n)]


def test_sphere_on_seven_slices_gives_one_finding_at_its_centre():
    locs = locations(20)
    centre = (12.0, -30.0, locs[9])  # on slice 9; radius 5 mm -> slices 6..12
    per_slice = sphere_slices(centre, 5.0, locs)
    assert len(per_slice) == 7
    ((_, f),) = run(DecodeSpec(), locs, per_slice)
    assert f.n_slices == 7
    np.testing.assert_allclose((f.x, f.y, f.z), centre, atol=1e-9)
    assert f.diameter_mm == pytest.approx(10.0)
    assert f.key_slice_location == centre[2]
    assert f.max_score == pytest.approx(0.9) and f.probability == f.max_score  # not elongated
    assert (f.first_slice_location, f.last_slice_location) == (locs[6], locs[12])
    assert f.z_extent_mm == pytest.approx(6 * SPACING)


def test_centre_is_score_weighted():
    locs = locations(6)
    scores = [0.3, 0.9, 0.6]
    xs = [1.0, 2.0, 4.0]
    per_slice = {locs[k + 1]: [det(xs[k], 5.0, locs[k + 1], score=s)] for k, s in enumerate(scores)}
    ((_, f),) = run(DecodeSpec(), locs, per_slice)
    assert f.x == pytest.approx(np.average(xs, weights=scores))
    assert f.z == pytest.approx(np.average(locs[1:4], weights=scores))
    assert f.key_slice_location == locs[2]


def test_two_nodules_close_in_z_far_in_plane():
    locs = locations(16)
    a = sphere_slices((0.0, 0.0, locs[6]), 4.0, locs)
    b = sphere_slices((40.0, 10.0, locs[7]), 4.0, locs)
    found = [f for _, f in run(DecodeSpec(), locs, merge(a, b))]
    assert len(found) == 2
    got = sorted((f.x, f.y, f.z) for f in found)
    np.testing.assert_allclose(got, [(0.0, 0.0, locs[6]), (40.0, 10.0, locs[7])], atol=1e-9)


@pytest.mark.parametrize("max_gap", [0, 1, 2])
def test_finding_is_emitted_as_soon_as_the_gap_is_exceeded(max_gap):
    locs = locations(12)
    per_slice = {loc: [det(5.0, 5.0, loc)] for loc in locs[2:6]}  # last detection on slice 5
    emitted = run(DecodeSpec(max_gap_slices=max_gap), locs, per_slice)
    assert [n for n, _ in emitted] == [5 + max_gap + 1]  # the first slice past the gap, before flush


def test_finding_streams_out_while_later_nodule_is_still_open():
    locs = locations(12)
    per_slice = merge(
        {loc: [det(0.0, 0.0, loc)] for loc in locs[0:3]},
        {loc: [det(50.0, 0.0, loc)] for loc in locs[2:12]},
    )
    emitted = run(DecodeSpec(max_gap_slices=1), locs, per_slice)
    assert [(n, round(f.x)) for n, f in emitted] == [(4, 0), (12, 50)]


def test_decreasing_slice_order_gives_the_same_finding():
    locs = locations(20, start=-100.0)
    centre = (3.0, 4.0, locs[8] + 0.4)
    per_slice = sphere_slices(centre, 6.0, locs)
    ((_, up),) = run(DecodeSpec(), locs, per_slice)
    ((_, down),) = run(DecodeSpec(), locs[::-1], per_slice)
    assert down.first_slice_location == up.last_slice_location
    assert down.last_slice_location == up.first_slice_location
    for key in ("x", "y", "z", "diameter_mm", "probability", "n_slices", "z_extent_mm", "key_slice_location"):
        assert getattr(down, key) == pytest.approx(getattr(up, key)), key


def test_decreasing_order_streams_findings_in_arrival_order():
    locs = locations(20)[::-1]
    per_slice = merge(
        {loc: [det(0.0, 0.0, loc)] for loc in locs[1:4]},
        {loc: [det(60.0, 0.0, loc)] for loc in locs[2:5]},
    )
    found = [f for _, f in run(DecodeSpec(max_gap_slices=5), locs, per_slice)]
    assert [round(f.x) for f in found] == [0, 60]  # ordered by key slice in arrival order


def test_out_of_order_or_repeated_slice_raises():
    agg = SeriesFindingAggregator(DecodeSpec())
    agg.add_slice(10.0, [])
    agg.add_slice(8.0, [])  # decreasing
    with pytest.raises(ValueError, match="out of order"):
        agg.add_slice(9.0, [])
    with pytest.raises(ValueError, match="twice"):
        agg.add_slice(8.0, [])
    with pytest.raises(ValueError, match="slice location"):
        agg.add_slice(6.0, [det(0.0, 0.0, 7.0)])  # detection from another slice
    agg.add_slice(6.0, [])  # state untouched by the rejected calls


def test_long_tube_along_z_is_penalised():
    locs = locations(30, step=1.0)
    tube = {loc: [det(0.0, 0.0, loc, diameter=3.0, score=0.9)] for loc in locs[0:25]}
    ((_, f),) = run(DecodeSpec(max_elongation=3.0), locs, tube)
    elongation = 24.0 / 3.0
    assert f.max_score == pytest.approx(0.9)
    assert f.probability == pytest.approx(0.9 * 3.0 / elongation)
    ((_, off),) = run(DecodeSpec(max_elongation=None), locs, tube)
    assert off.probability == pytest.approx(0.9)

    # a round nodule with the same score is not penalised
    nodule = sphere_slices((0.0, 0.0, 10.0), 5.0, locs, score=0.9)
    ((_, n),) = run(DecodeSpec(max_elongation=3.0), locs, nodule)
    assert n.probability == n.max_score


def test_flat_blob_is_penalised_by_its_z_span():
    locs = locations(12, step=1.0)
    # seen on 2 slices, 10 mm wide: span = 1 mm extent + 1 mm spacing = 2 mm
    flat = {loc: [det(0.0, 0.0, loc, diameter=10.0, score=0.8)] for loc in locs[4:6]}
    ((_, f),) = run(DecodeSpec(min_z_span=0.5, max_elongation=None), locs, flat)
    assert f.probability == pytest.approx(0.8 * (2.0 / (0.5 * 10.0)) ** 2)
    ((_, off),) = run(DecodeSpec(min_z_span=None), locs, flat)
    assert off.probability == pytest.approx(0.8)

    # a sphere is as deep as it is wide: not penalised
    nodule = sphere_slices((0.0, 0.0, 6.0), 4.0, locs, score=0.9)
    ((_, n),) = run(DecodeSpec(min_z_span=0.7), locs, nodule)
    assert n.probability == n.max_score


def test_min_z_span_is_validated():
    for bad in (0, 1.5, "0.5", float("nan")):
        with pytest.raises(ConfigError, match="min_z_span"):
            DecodeSpec(min_z_span=bad)
    assert DecodeSpec.from_json(DecodeSpec(min_z_span=0.7).to_json()).min_z_span == 0.7


@pytest.mark.parametrize("max_gap, expected", [(1, [6]), (0, [3, 3])])
def test_one_missing_slice_is_bridged_within_tolerance(max_gap, expected):
    locs = locations(10)
    per_slice = {loc: [det(7.0, 7.0, loc)] for k, loc in enumerate(locs[1:8]) if k != 3}
    found = [f for _, f in run(DecodeSpec(max_gap_slices=max_gap), locs, per_slice)]
    assert [f.n_slices for f in found] == expected


def test_short_tracks_are_dropped():
    locs = locations(10)
    per_slice = merge(
        {locs[2]: [det(-40.0, 0.0, locs[2])]},  # one-slice false positive
        {loc: [det(30.0, 0.0, loc)] for loc in locs[4:7]},
    )
    assert [f.n_slices for _, f in run(DecodeSpec(min_slices=2), locs, per_slice)] == [3]
    assert [f.n_slices for _, f in run(DecodeSpec(min_slices=1), locs, per_slice)] == [1, 3]
    assert run(DecodeSpec(min_slices=4), locs, per_slice) == []


def test_flush_emits_open_tracks_and_nothing_is_emitted_twice():
    locs = locations(17)
    rng = np.random.default_rng(4)
    centres = [(-60.0 + 30.0 * k, 10.0 * k, locs[2 + 3 * k]) for k in range(5)]  # last one reaches the last slice
    per_slice = merge(*[sphere_slices(c, 4.0, locs, score=rng.uniform(0.5, 1.0)) for c in centres])
    agg = SeriesFindingAggregator(DecodeSpec())
    streamed = []
    for loc in locs:
        streamed += agg.add_slice(loc, per_slice.get(loc, []))
    assert agg.open_tracks == 1
    flushed = agg.flush()
    assert len(flushed) == 1 and flushed[0].x == pytest.approx(centres[-1][0])
    assert agg.flush() == [] and agg.open_tracks == 0
    everything = streamed + flushed
    assert len(everything) == 5
    np.testing.assert_allclose(sorted((f.x, f.y, f.z) for f in everything), sorted(centres), atol=1e-9)
    with pytest.raises(RuntimeError, match="flush"):
        agg.add_slice(locs[-1] + SPACING, [])


def test_one_detection_per_track_per_slice_greedy_by_score():
    locs = locations(6)
    per_slice = {loc: [det(0.0, 0.0, loc, score=0.9)] for loc in locs[0:3]}
    # a weaker detection nearer to the track than the strong one on slice 3: the strong one links first
    per_slice[locs[3]] = [det(0.5, 0.0, locs[3], score=0.4), det(2.0, 0.0, locs[3], score=0.95)]
    spec = DecodeSpec(link_distance_mm=3.0, max_gap_slices=0, min_slices=1)
    found = sorted((f for _, f in run(spec, locs, per_slice)), key=lambda f: f.n_slices)
    assert [f.n_slices for f in found] == [1, 4]
    assert found[0].max_score == pytest.approx(0.4) and found[1].max_score == pytest.approx(0.95)


def test_link_radius_grows_with_diameter():
    locs = locations(6)
    per_slice = {locs[1]: [det(0.0, 0.0, locs[1], diameter=20.0)], locs[2]: [det(8.0, 0.0, locs[2], diameter=18.0)]}
    small = DecodeSpec(link_distance_mm=2.0, min_slices=1)
    assert [f.n_slices for _, f in run(small, locs, per_slice)] == [2]  # 8 mm < 20 / 2
    per_slice[locs[2]] = [det(11.0, 0.0, locs[2], diameter=18.0)]
    assert len(run(small, locs, per_slice)) == 2


def test_oblique_series_links_in_the_slice_plane():
    # gantry tilt: parallel planes whose normal is tilted 30 degrees; a fixed 3-D point projects
    # onto each plane at positions whose patient-xy shift (2.5 mm per slice) exceeds the link distance
    tilt = np.radians(30.0)
    normal = np.array([0.0, np.sin(tilt), np.cos(tilt)])
    centre = np.array([10.0, 20.0, 30.0])
    per_slice = {}
    locs = [float(centre @ normal) + 5.0 * k for k in range(-4, 5)]
    for loc in locs[2:7]:
        p = centre - (centre @ normal - loc) * normal
        per_slice[loc] = [SliceDetection(*p, diameter_mm=1.0, score=0.8, slice_location=loc, row=0.0, col=0.0)]
    ((_, f),) = run(DecodeSpec(link_distance_mm=1.0, max_gap_slices=0), locs, per_slice)
    assert f.n_slices == 5
    np.testing.assert_allclose((f.x, f.y, f.z), centre, atol=1e-9)


def test_finding_to_dict_is_json_ready():
    locs = locations(8)
    ((_, f),) = run(DecodeSpec(), locs, sphere_slices((1.0, 2.0, locs[4]), 4.0, locs))
    d = json.loads(json.dumps(f.to_dict()))
    assert d["n_slices"] == f.n_slices and d["probability"] == f.probability
    assert Finding(**d) == f
