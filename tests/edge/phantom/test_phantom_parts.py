"""Building blocks: partial-volume weights, capsules, lung trees, nodule placement."""

import numpy as np
import pytest

from edge.phantom.anatomy import sample_anatomy
from edge.phantom.lungmap import LungMap
from edge.phantom.nodules import make_shape, place_nodules, render_nodule
from edge.phantom.render import TubeLayer, composite_layers, slab_weights
from edge.phantom.shapes import TubeSet
from edge.phantom.vessels import build_lung_trees, place_hila


@pytest.fixture(scope="module")
def patient():
    rng = np.random.default_rng(8)
    anatomy = sample_anatomy(rng)
    lung = LungMap(anatomy, step=4.0)
    place_hila(anatomy, lung)
    trees = build_lung_trees(anatomy, lung, rng, stop_radius=1.0, points_per_lung=3000)
    return anatomy, lung, trees


@pytest.mark.parametrize("thickness,spacing", [(2.5, 2.5), (1.25, 0.625), (2.0, 1.0), (1.0, 0.8)])
def test_slab_weights_average_over_the_slice_thickness(thickness, spacing):
    z = np.arange(10) * spacing
    step = spacing / np.ceil(spacing / 0.5)
    fine = np.arange(z[0] - thickness, z[-1] + thickness, step) + step / 2
    w = slab_weights(z, thickness, fine, step)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    centre = (w * fine[None, :]).sum(axis=1)
    np.testing.assert_allclose(centre, z, atol=1e-5)


def test_capsule_volume_matches_geometry():
    r, length, h = 2.0, 10.0, 0.25
    tubes = TubeSet([[-length / 2, 0, 0]], [[length / 2, 0, 0]], [r], [r])
    ax = np.arange(-8, 8, h)
    out = np.zeros((len(ax),) * 3, np.float32)
    tubes.render(out, ax, ax, ax, soft=h)
    volume = out.sum() * h ** 3
    expected = np.pi * r * r * length + 4 / 3 * np.pi * r ** 3
    assert volume == pytest.approx(expected, rel=0.03)


def test_trees_taper_and_stay_mostly_in_the_lungs(patient):
    _, lung, trees = patient
    vessels = trees.vessels
    assert len(vessels) > 200
    thin = np.maximum(vessels.r0, vessels.r1) < 1.5
    assert thin.mean() > 0.5  # most branches are small
    assert np.maximum(vessels.r0, vessels.r1).max() > 5.0  # hilar trunks are large
    inside = lung.contains(vessels.p1[thin])
    assert inside.mean() > 0.9
    # branches go in every direction, so cut vessels appear as round blobs on axial slices
    d = vessels.p1 - vessels.p0
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    assert (np.abs(d[:, 2]) > 0.8).mean() > 0.1 and (np.abs(d[:, 2]) < 0.3).mean() > 0.1


def test_nodules_are_placed_where_their_location_says(patient):
    anatomy, lung, trees = patient
    rng = np.random.default_rng(1)
    z_range = (anatomy.z_recess + 30, anatomy.z_apex - 30)
    shapes = place_nodules(rng, lung, trees.vessels, 12, z_range, False, 0.7)
    assert len(shapes) >= 6
    for s in shapes:
        n = s.nodule
        c = np.asarray(n.center)[None]
        assert z_range[0] <= n.center[2] <= z_range[1]
        if n.location == "parenchymal":
            assert lung.depth_at(c)[0] >= n.diameter_mm / 2
        elif n.location == "juxta_pleural":
            assert lung.wall_depth_at(c)[0] <= n.diameter_mm / 2 + lung.step * 1.5
    for a in shapes:
        for b in shapes:
            if a is not b:
                assert np.linalg.norm(a.center - b.center) > a.radius + b.radius


@pytest.mark.parametrize("kind,lo,hi", [("solid", -20, 100), ("ground_glass", -720, -220), ("part_solid", -700, 110)])
def test_nodule_rendering_has_the_kind_s_attenuation(kind, lo, hi):
    rng = np.random.default_rng(2)
    shape = make_shape(rng, (0.0, 0.0, 0.0), 12.0, kind, "parenchymal", False, 0.5)
    ax = np.arange(-10, 10, 0.5, dtype=np.float32)
    frac = np.zeros((len(ax),) * 3, np.float32)
    val = np.zeros_like(frac)
    render_nodule(shape, frac, val, ax, ax, ax, 0.5)
    core = frac > 0.99
    assert core.sum() * 0.5 ** 3 > 0.3 * 4 / 3 * np.pi * 6 ** 3
    hu = val[core] / frac[core]
    assert lo <= np.median(hu) <= hi
    if kind == "part_solid":
        assert hu.max() - hu.min() > 250  # solid core inside ground glass


def test_airways_yield_to_a_nodule_and_vessels_do_not():
    empty = TubeSet.empty()
    lumen = TubeLayer("airway_lumen", empty, -1014.0, yields_to_nodules=True)
    artery = TubeLayer("artery", empty, 40.0)
    nodule_hu = np.array([50.0, 50.0, -850.0], np.float32)  # nodule, nodule, lung
    nodule_fraction = np.array([1.0, 0.5, 0.0], np.float32)
    hu = nodule_hu.copy()
    composite_layers(hu, [lumen], [np.ones(3, np.float32)], nodule_fraction)
    assert hu[0] == 50.0 and -1014.0 < hu[1] < 50.0 and hu[2] == -1014.0  # partial volume at the nodule's edge
    hu = nodule_hu.copy()
    composite_layers(hu, [artery, lumen], [np.ones(3, np.float32), None], nodule_fraction)
    assert np.all(hu == 40.0)
    hu = nodule_hu.copy()
    composite_layers(hu, [lumen], [np.ones(3, np.float32)], None)
    assert np.all(hu == -1014.0)
