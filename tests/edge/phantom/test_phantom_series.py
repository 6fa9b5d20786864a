"""generate_series: determinism, tissue HU, nodule ground truth, storage and padding."""

import dataclasses

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.phantom import generate_series, get_profile
from edge.phantom.anatomy import sample_tissues
from edge.phantom.scanner import fov_mask, tissue_range

SIZE = 128
SLICES = 24


def quiet_profile(name="ge_standard", **changes):
    """A named profile made noise-free with 2.5 mm contiguous slices (easy to check)."""
    base = dict(noise_hu=(0.0, 0.0), slice_thickness_mm=(2.5,), spacing_ratio=(1.0,))
    base.update(changes)
    return dataclasses.replace(get_profile(name), **base)


@pytest.fixture(scope="module")
def quiet_series():
    return generate_series(11, quiet_profile(), size=160, n_slices=SLICES, n_nodules=4,
                           nodule_kinds=("solid", "ground_glass"))


def test_same_seed_gives_identical_series():
    a = generate_series(5, "ge_lung", size=SIZE, n_slices=SLICES)
    b = generate_series(5, "ge_lung", size=SIZE, n_slices=SLICES)
    assert a.pixels.dtype == b.pixels.dtype
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.series_uid == b.series_uid and a.sop_uids == b.sop_uids and a.study_uid == b.study_uid
    assert a.nodules == b.nodules
    c = generate_series(6, "ge_lung", size=SIZE, n_slices=SLICES)
    assert c.series_uid != a.series_uid
    assert not np.array_equal(c.pixels, a.pixels)


def test_tissue_hu_ranges_are_realistic():
    rng = np.random.default_rng(0)
    for contrast in (False, True):
        for _ in range(50):
            t = sample_tissues(rng, contrast)
            assert -120 <= t.fat <= -80
            assert 30 <= t.muscle <= 60
            assert -900 <= t.lung <= -700 and -900 <= t.lung + t.lung_gradient <= -650
            assert 700 <= t.cortex <= 1200
            assert 150 <= t.trabecular <= 400
            if not contrast:
                for blood in (t.blood_artery, t.blood_pulmonary, t.blood_vein):
                    assert 25 <= blood <= 55


def _mode(values, lo, hi):
    hist, edges = np.histogram(values, bins=np.arange(lo, hi + 1, 5))
    return edges[np.argmax(hist)] + 2.5


def test_rendered_tissues_land_in_their_hu_ranges(quiet_series):
    hu = quiet_series.hu()
    inside = fov_mask(hu.shape[1], quiet_series.profile.fov_fraction)
    values = hu[:, inside]
    assert values.min() >= -1024 and values.max() <= 1300
    assert -1010 <= _mode(values, -1024, -950) <= -985  # air around the patient
    lung = values[(values > -950) & (values < -500)]
    assert lung.size > 0.05 * values.size
    assert -900 <= np.median(lung) <= -680
    assert -120 <= _mode(values, -150, -60) <= -75  # fat
    assert 20 <= _mode(values, 0, 100) <= 70  # muscle, blood, soft tissue
    assert (values > 600).sum() > 20  # bone cortex present
    assert (values > 150).sum() > (values > 600).sum()  # trabecular bone below cortex


def test_nodule_centres_map_to_nodule_like_pixels(quiet_series):
    s = quiet_series
    assert len(s.nodules) >= 2
    hu = s.hu()
    z = np.array([g.position[2] for g in s.geometries])
    checked = 0
    for n in s.nodules:
        if n.diameter_mm < 8:
            continue
        k = int(np.argmin(np.abs(z - n.center[2])))
        row, col = s.geometries[k].patient_to_pixel(n.center)
        r, c = int(round(float(row))), int(round(float(col)))
        value = float(np.median(hu[k, r - 1:r + 2, c - 1:c + 2]))
        if n.kind == "solid":
            assert value > -250, (n, value)
        else:
            assert -800 < value < -100, (n, value)
        checked += 1
    assert checked >= 1


def test_nodule_ground_truth_is_in_range(quiet_series):
    s = quiet_series
    z = sorted(g.position[2] for g in s.geometries)
    for n in s.nodules:
        assert 4.0 <= n.diameter_mm <= 30.0
        assert n.kind in ("solid", "ground_glass")
        assert n.location in ("parenchymal", "juxta_pleural", "juxta_vascular")
        assert z[0] - 1.25 <= n.center[2] <= z[-1] + 1.25


@pytest.mark.parametrize("name", ["ge_standard", "philips_c", "siemens_b30f", "canon_fc52_lowdose"])
def test_storage_and_padding_follow_the_profile(name):
    prof = get_profile(name)
    s = generate_series(3, prof, size=96, n_slices=4, n_nodules=0)
    assert s.pixels.dtype == (np.int16 if prof.signed else np.uint16)
    assert s.rescale_intercept == prof.rescale_intercept
    inside = fov_mask(96, prof.fov_fraction)
    outside_values = np.unique(s.pixels[:, ~inside])
    lo, hi = tissue_range(prof)
    tissue = s.pixels[:, inside]
    assert tissue.min() >= lo and tissue.max() <= hi
    if prof.padding_value is None:
        assert s.padding is None
        assert list(outside_values) == [lo]
    else:
        assert s.padding == (prof.padding_value, prof.padding_value)
        assert list(outside_values) == [prof.padding_value]
        assert not np.any(tissue == prof.padding_value)
        # padding is impossible as tissue: below -1024 HU, or the reserved minimum
        assert prof.padding_value + prof.rescale_intercept < -1024 or prof.padding_value < lo


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="size"):
        generate_series(1, "ge_standard", size=16)
    with pytest.raises(ConfigError, match="unknown scanner profile"):
        generate_series(1, "no_such_scanner")
    with pytest.raises(ConfigError, match="nodule kind"):
        generate_series(1, "ge_standard", size=64, n_slices=2, nodule_kinds=("huge",))
    with pytest.raises(ConfigError, match="padding_value"):
        dataclasses.replace(get_profile("ge_standard"), padding_value=100)
