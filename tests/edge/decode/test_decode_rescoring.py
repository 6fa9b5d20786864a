"""Tests for edge.decode.rescoring: track measurements, features and the logistic rescorer in the decode spec."""

import json
import math

import numpy as np
import pytest

from edge.decode.findings import SeriesFindingAggregator
from edge.decode.peaks import SliceDetection
from edge.decode.rescoring import FEATURE_NAMES, FindingRescorer, features_matrix, finding_features
from edge.decode.spec import DecodeSpec
from edge.errors import ConfigError

SPACING = 1.0


def det(x, y, loc, diameter, score):
    return SliceDetection(x=x, y=y, z=loc, diameter_mm=diameter, score=score, slice_location=loc, row=0.0, col=0.0)


def one_finding(spec, per_slice, n_slices=40):
    agg = SeriesFindingAggregator(spec)
    found = []
    for k in range(n_slices):
        loc = k * SPACING
        found += agg.add_slice(loc, per_slice.get(loc, []))
    found += agg.flush()
    assert len(found) == 1
    return found[0]


def sphere(radius=4.0, centre_z=20.0, score=0.9):
    out = {}
    for k in range(40):
        dz = k * SPACING - centre_z
        if abs(dz) < radius:
            r = math.sqrt(radius**2 - dz**2)
            out[k * SPACING] = [det(0.0, 0.0, k * SPACING, 2 * r, score * r / radius)]
    return out


def oblique_vessel(diameter=4.0, slope=0.5, score=0.9):
    """A tube crossing slices 5..34, moving ``slope`` mm in x per mm of z, constant width and score."""
    return {k * SPACING: [det(slope * k * SPACING, 0.0, k * SPACING, diameter, score)] for k in range(5, 35)}


def test_track_measurements_of_a_sphere_and_a_vessel():
    spec = DecodeSpec(stride=2, min_slices=1, max_elongation=None)
    ball = one_finding(spec, sphere())
    # narrows toward its ends: slices at dz = +-3 mm cut the 4 mm radius in sqrt(7) mm
    assert ball.end_diameter_ratio == pytest.approx(math.sqrt(7) / 4)
    assert ball.end_score_ratio == pytest.approx(math.sqrt(7) / 4)
    assert ball.drift_mm == pytest.approx(0.0)
    assert ball.mean_score < ball.max_score
    tube = one_finding(spec, oblique_vessel())
    assert tube.end_diameter_ratio == pytest.approx(1.0)
    assert tube.end_score_ratio == pytest.approx(1.0)
    assert tube.drift_mm == pytest.approx(0.5 * 29 * SPACING)
    fb, ft = finding_features(ball), finding_features(tube)
    i = FEATURE_NAMES.index
    # z span / diameter: the sphere's 6 mm extent + 1 spacing over its 8 mm, the tube's 29 + 1 mm over 4 mm
    assert ball.diameter_mm == pytest.approx(8.0)
    assert fb[i("log_depth_ratio")] == pytest.approx(math.log(7.0 / 8.0))
    assert ft[i("log_depth_ratio")] == pytest.approx(math.log(30.0 / 4.0))
    assert ft[i("drift_per_z_span")] == pytest.approx(14.5 / 30.0)
    assert fb[i("slice_fill")] == pytest.approx(1.0)
    assert fb[i("logit_max_score")] == pytest.approx(math.log(0.9 / 0.1))


def test_features_of_a_one_slice_series_are_finite():
    spec = DecodeSpec(stride=2, min_slices=1, max_elongation=None)
    agg = SeriesFindingAggregator(spec)
    agg.add_slice(0.0, [det(0.0, 0.0, 0.0, 5.0, 1.0)])
    (f,) = agg.flush()
    assert f.slice_spacing_mm == 0.0
    features = finding_features(f)
    assert np.all(np.isfinite(features))
    # no depth to measure: neutral (as deep as wide), whole slab filled, no drift
    for name, value in (("log_depth_ratio", 0.0), ("slice_fill", 1.0), ("drift_per_z_span", 0.0)):
        assert features[FEATURE_NAMES.index(name)] == value


def _rescorer(**weights):
    names = tuple(weights)
    return FindingRescorer(names, (0.0,) * len(names), (1.0,) * len(names), tuple(weights.values()), 0.0)


def test_rescorer_in_the_spec_replaces_the_shape_prior():
    # prefers short, well-filled tracks; ignores the score
    rescorer = _rescorer(log_depth_ratio_sq=-2.0, drift_per_z_span=-4.0)
    plain = DecodeSpec(stride=2, min_slices=1, max_elongation=None)
    scored = DecodeSpec(stride=2, min_slices=1, max_elongation=0.5, rescorer=rescorer)
    ball, tube = one_finding(scored, sphere(score=0.5)), one_finding(scored, oblique_vessel(score=0.95))
    assert ball.probability > tube.probability  # the opposite of their scores
    expected = 1 / (1 + math.exp(-(-2.0 * finding_features(ball)[3] - 4.0 * finding_features(ball)[7])))
    assert ball.probability == pytest.approx(expected)
    # without a rescorer: the best slice score (the shape prior is off in ``plain``)
    assert one_finding(plain, sphere(score=0.5)).probability == pytest.approx(0.5)
    assert rescorer.probability(ball) == pytest.approx(ball.probability)


def test_spec_with_rescorer_round_trips_through_json_and_without_one_serialises_as_before():
    rescorer = FindingRescorer(("logit_max_score", "slice_fill"), (0.1, 0.9), (2.0, 0.1), (1.5, -0.5), -3.0)
    spec = DecodeSpec(rescorer=rescorer)
    again = DecodeSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json())["rescorer"]["features"] == ["logit_max_score", "slice_fill"]
    assert "rescorer" not in json.loads(DecodeSpec().to_json())
    assert DecodeSpec.from_dict({**DecodeSpec().to_dict(), "rescorer": None}).rescorer is None


@pytest.mark.parametrize("bad, message", [
    ({"features": ["colour"]}, "unknown feature"),
    ({"features": ["slice_fill", "slice_fill"], "mean": [0, 0], "scale": [1, 1], "weights": [1, 1]}, "twice"),
    ({"mean": [0, 0]}, "one value per feature"),
    ({"scale": [0.0]}, "scale values must be > 0"),
    ({"weights": ["x"]}, "list of numbers"),
    ({"weights": [float("nan")]}, "finite"),
    ({"bias": "high"}, "bias must be a number"),
    ({"extra": 1}, "unknown key"),
    ("not a dict", "JSON object"),
])
def test_bad_rescorer_is_a_config_error_naming_the_field(bad, message):
    good = {"features": ["slice_fill"], "mean": [0.0], "scale": [1.0], "weights": [1.0], "bias": 0.0}
    d = {**good, **bad} if isinstance(bad, dict) else bad
    with pytest.raises(ConfigError, match=message):
        DecodeSpec.from_dict({"rescorer": d})


def test_features_matrix_has_a_row_per_finding():
    spec = DecodeSpec(stride=2, min_slices=1, max_elongation=None)
    f = one_finding(spec, sphere())
    assert features_matrix([f, f]).shape == (2, len(FEATURE_NAMES))
    assert features_matrix([]).shape == (0, len(FEATURE_NAMES))
