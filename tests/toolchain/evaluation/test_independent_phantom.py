"""The independent phantom generator: ground truth where the files say it is, every storage convention."""

import csv
import dataclasses

import numpy as np
import pytest

from edge.folder import group_series, load_series
from edge.errors import ConfigError
from toolchain.evaluation import independent_phantom as ip

SIZE = 128


def _lung_point(series, margin):
    """A point deep in the lungs within the series' z range."""
    rng = np.random.default_rng(0)
    ca, cb = series.body.cavity
    z = float(np.median(series.slice_z))
    for _ in range(20000):
        c = np.array([rng.uniform(-ca, ca), rng.uniform(-cb, cb), z])
        if ip.lung_mask(series.body, *(c + ip._DIRECTIONS * margin).T).all():
            return c
    raise AssertionError("no lung point found")


def _series_with_nodule(acq_changes=None, kind="solid", diameter=18.0):
    """A small series with one ellipsoid nodule deep in a lung and no vessels."""
    s = ip.make_series(seed=5, index=2, size=SIZE, n_slices=5)
    if acq_changes:
        s = dataclasses.replace(s, acquisition=dataclasses.replace(s.acquisition, **acq_changes))
    s.vessels = ip.Vessels(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
    centre = _lung_point(s, diameter + 4.0)
    nod = ip.make_nodule(centre, diameter, kind, "parenchymal", np.random.default_rng(1))
    nod.parts[:] = nod.parts[:1]  # one ellipsoid: its centre is inside whatever its orientation
    nod.spicules.clear()
    s.nodules[:] = [nod]
    return s


def _read_back(folder):
    groups, rejected = group_series(folder)
    assert rejected == [] and len(groups) == 1
    frames, rejected = load_series(groups[0])
    assert rejected == []
    return sorted(frames, key=lambda f: f.geometry.position[2])


def _hu_at(frames, xyz):
    frame = min(frames, key=lambda f: abs(f.geometry.position[2] - xyz[2]))
    row, col = frame.geometry.patient_to_pixel(xyz)
    return float(frame.hu()[int(round(float(row))), int(round(float(col)))])


def test_series_is_deterministic_in_seed_and_index():
    a, b = ip.make_series(7, 3, size=SIZE, n_slices=5), ip.make_series(7, 3, size=SIZE, n_slices=5)
    assert a.acquisition == b.acquisition and a.series_uid == b.series_uid
    assert [n.centre.tolist() for n in a.nodules] == [n.centre.tolist() for n in b.nodules]
    np.testing.assert_array_equal(a.vessels.p1, b.vessels.p1)
    c = ip.make_series(7, 4, size=SIZE, n_slices=5)
    assert c.series_uid != a.series_uid and not np.array_equal(c.vessels.p1[:10], a.vessels.p1[:10])


def test_nodules_lie_in_the_lungs_and_in_the_scanned_range():
    for index in range(12):
        s = ip.make_series(11, index, size=SIZE, n_slices=40)
        for nod in s.nodules:
            assert s.slice_z[0] <= nod.centre[2] <= s.slice_z[-1]
            assert ip.lung_mask(s.body, *nod.centre)
            assert 3.5 <= nod.diameter_mm <= 28.0 and nod.kind in ip.NODULE_TYPES and nod.location in ip.LOCATIONS


@pytest.mark.parametrize("feet_first", [False, True])
@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle"])
def test_nodule_is_where_the_annotation_says(tmp_path, feet_first, syntax):
    s = _series_with_nodule({"feet_first": feet_first, "transfer_syntax": syntax, "thickness": 1.0,
                             "blur_mm": 0.0, "sharpen": 0.0})
    ip.write_series(s, tmp_path / "s", with_noise=False)
    frames = _read_back(tmp_path / "s")
    assert len(frames) == 5 and {f.series_uid for f in frames} == {s.series_uid}
    np.testing.assert_allclose([f.geometry.position[2] for f in frames], s.slice_z, atol=1e-3)
    nod = s.nodules[0]
    assert _hu_at(frames, nod.centre) == pytest.approx(nod.hu, abs=3.0)
    # a diameter away, still in the lung, is parenchyma
    assert _hu_at(frames, nod.centre + np.array([nod.diameter_mm, 0.0, 0.0])) < -750.0


def test_feet_first_mirrors_the_columns():
    hfs = _series_with_nodule({"feet_first": False})
    ffs = dataclasses.replace(hfs, acquisition=dataclasses.replace(hfs.acquisition, feet_first=True))
    z = float(hfs.slice_z[2])
    a, b = ip.render_slice(hfs, z), ip.render_slice(ffs, z)
    np.testing.assert_allclose(a, b[:, ::-1], atol=1e-3)


@pytest.mark.parametrize("storage", ip.STORAGE_CONVENTIONS)
def test_every_storage_convention_reads_back_the_same_hu(tmp_path, storage):
    s = _series_with_nodule({"storage": storage, "transfer_syntax": "explicit", "padding": True})
    expected = np.maximum(ip.render_slice(s, float(s.slice_z[0])), -1024.0)
    ip.write_series(s, tmp_path / "s", with_noise=False)
    frame = _read_back(tmp_path / "s")[0]
    hu = frame.hu()
    inside = ~frame.padding_mask
    assert inside.mean() > 0.5 and frame.padding_mask.any()
    tolerance = storage[3] / 2.0 + 1e-3 + 0.5  # rounding of stored values, plus the one value kept off padding
    np.testing.assert_allclose(hu[inside], np.clip(expected[inside], -1024.0, None), atol=tolerance)


def test_make_set_writes_the_layout_evaluate_reads(tmp_path):
    out = ip.make_independent_set(tmp_path / "set", 2, seed=3, size=SIZE, n_slices=4)
    rows = list(csv.DictReader(open(out / "series.csv")))
    assert [r["folder"] for r in rows] == ["series_0000", "series_0001"]
    ann = list(csv.DictReader(open(out / "annotations.csv")))
    meta = list(csv.DictReader(open(out / "annotations_meta.csv")))
    assert len(ann) == len(meta) == sum(int(r["n_nodules"]) for r in rows)
    assert ann and set(ann[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}
    for r in rows:
        assert len(list((out / r["folder"]).iterdir())) == 4


@pytest.mark.parametrize("kwargs, message", [({"count": 0}, "series must be >= 1"), ({"workers": 0}, "workers"),
                                             ({"size": 32}, "size must be >= 64"), ({"n_slices": 2}, "slices")])
def test_bad_settings_are_config_errors_before_any_file(tmp_path, kwargs, message):
    args = {"count": 1, "seed": 0, "size": SIZE, "n_slices": 4}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        ip.make_independent_set(tmp_path / "set", **args)
    assert not (tmp_path / "set").exists()
