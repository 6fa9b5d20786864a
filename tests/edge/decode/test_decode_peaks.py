"""Tests for edge.decode.peaks (and the DecodeSpec it is driven by)."""

import numpy as np
import pytest

from edge.decode.peaks import (
    PEAK_DTYPE,
    detections_to_patient,
    extract_peaks,
    extract_peaks_batch,
    grid_to_input,
    input_to_grid,
    local_maxima,
)
from edge.decode.spec import DecodeSpec
from edge.errors import ConfigError
from edge.geometry import SliceGeometry
from edge.preprocess.spec import PreprocessSpec


# --- DecodeSpec -------------------------------------------------------------------------------


def test_spec_json_roundtrip():
    spec = DecodeSpec(stride=8, score_threshold=0.45, nms_kernel=5, max_elongation=None, min_slices=3)
    assert DecodeSpec.from_json(spec.to_json()) == spec
    assert DecodeSpec.from_dict({}) == DecodeSpec()


@pytest.mark.parametrize(
    "key, value",
    [
        ("stride", 0),
        ("stride", 2.0),
        ("score_threshold", 1.5),
        ("score_threshold", float("nan")),
        ("nms_kernel", 4),
        ("nms_kernel", True),
        ("max_detections_per_slice", 0),
        ("link_distance_mm", 0),
        ("link_distance_mm", "5"),
        ("max_gap_slices", -1),
        ("min_slices", 0),
        ("max_elongation", 0),
        ("version", 2),
    ],
)
def test_spec_rejects_bad_value_naming_key(key, value):
    with pytest.raises(ConfigError, match=f"decode.{key}"):
        DecodeSpec.from_dict({key: value})


def test_spec_rejects_unknown_key_and_bad_json():
    with pytest.raises(ConfigError, match="nms_size"):
        DecodeSpec.from_dict({"nms_size": 3})
    with pytest.raises(ConfigError, match="not valid JSON"):
        DecodeSpec.from_json("{stride: 4")
    with pytest.raises(ConfigError, match="JSON object"):
        DecodeSpec.from_json("[4]")


# --- grid convention --------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, 4, 5, 8])
def test_grid_roundtrip_is_exact(stride):
    rng = np.random.default_rng(stride)
    y = rng.uniform(-0.5, 100 - 0.5, 500)
    x = rng.uniform(-0.5, 60 - 0.5, 500)
    i, j, dy, dx = input_to_grid(y, x, stride)
    assert i.dtype.kind == "i" and j.dtype.kind == "i"
    assert np.all((dy >= -0.5 - 1e-12) & (dy < 0.5)) and np.all((dx >= -0.5 - 1e-12) & (dx < 0.5))
    assert i.min() >= 0 and i.max() <= (100 - 1) // stride and j.max() <= (60 - 1) // stride
    yb, xb = grid_to_input(i, j, dy, dx, stride)
    np.testing.assert_allclose(yb, y, rtol=0, atol=1e-9)
    np.testing.assert_allclose(xb, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("stride", [1, 3, 4])
def test_cell_pools_its_pixel_block(stride):
    # integer input pixels stride*k .. stride*k + stride-1 belong to cell k; its centre has zero offset
    for k in range(3):
        for p in range(stride * k, stride * (k + 1)):
            assert input_to_grid(p, p, stride)[:2] == (k, k)
        assert input_to_grid(stride * k + (stride - 1) / 2, 0.0, stride)[2] == pytest.approx(0.0)
    assert grid_to_input(0, 0, 0.0, 0.0, stride) == ((stride - 1) / 2, (stride - 1) / 2)


# --- local maxima -----------------------------------------------------------------------------


def _local_maxima_reference(hm, kernel):
    """Pixel loops: max of the clipped window, ties go to the raster-first maximum."""
    h, w = hm.shape
    r = kernel // 2
    is_max = np.zeros_like(hm, bool)
    for y in range(h):
        for x in range(w):
            is_max[y, x] = hm[y, x] == hm[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].max()
    keep = is_max.copy()
    for y in range(h):
        for x in range(w):
            for yy in range(max(0, y - r), min(h, y + r + 1)):
                for xx in range(max(0, x - r), min(w, x + r + 1)):
                    earlier = (yy, xx) < (y, x)
                    if earlier and is_max[yy, xx] and hm[yy, xx] == hm[y, x]:
                        keep[y, x] = False
    return keep


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_local_maxima_matches_reference(kernel):
    rng = np.random.default_rng(kernel)
    hm = rng.integers(0, 6, size=(13, 17)).astype(np.float32) / 5 - 0.5  # few levels: many ties
    np.testing.assert_array_equal(local_maxima(hm, kernel), _local_maxima_reference(hm, kernel))


def test_local_maxima_batched_axes_match_per_slice():
    rng = np.random.default_rng(0)
    hm = rng.random((3, 2, 9, 11)).astype(np.float32)
    mask = local_maxima(hm, 3)
    for n in range(3):
        for c in range(2):
            np.testing.assert_array_equal(mask[n, c], local_maxima(hm[n, c], 3))


def test_saturated_plateau_gives_one_peak_and_border_peaks_are_kept():
    hm = np.zeros((8, 8), np.float16)
    hm[3:5, 3:5] = 1.0  # fp16 sigmoid saturates: four equal cells
    hm[0, 7] = 0.7  # corner
    peaks = extract_peaks(hm, np.ones((8, 8)), np.zeros((2, 8, 8)), DecodeSpec(score_threshold=0.5))
    assert [(p["i"], p["j"]) for p in peaks] == [(3, 3), (0, 7)]


# --- extract_peaks ----------------------------------------------------------------------------


def _blobs(shape, centres, scores, sigma=1.2):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    hm = np.zeros(shape)
    for (cy, cx), s in zip(centres, scores):
        hm = np.maximum(hm, s * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))
    return hm.astype(np.float32)


def test_extract_peaks_threshold_topk_and_order():
    rng = np.random.default_rng(1)
    centres = [(5 + 10 * a, 5 + 10 * b) for a in range(4) for b in range(5)]
    scores = rng.uniform(0.05, 0.95, len(centres))
    hm = _blobs((40, 50), centres, scores)
    size = np.zeros_like(hm)
    off = np.zeros((2,) + hm.shape, np.float32)
    spec = DecodeSpec(score_threshold=0.4, max_detections_per_slice=6)
    peaks = extract_peaks(hm, size, off, spec)
    assert peaks.dtype == PEAK_DTYPE
    expected = sorted(
        [(s, c) for s, c in zip(scores, centres) if s >= 0.4], key=lambda t: -t[0]
    )[: spec.max_detections_per_slice]
    assert len(peaks) == len(expected)
    assert [(int(p["i"]), int(p["j"])) for p in peaks] == [c for _, c in expected]
    np.testing.assert_allclose(peaks["score"], [s for s, _ in expected], rtol=1e-6)

    few = extract_peaks(hm, size, off, DecodeSpec(score_threshold=0.9))
    assert len(few) == int(np.sum(scores >= 0.9))
    assert len(extract_peaks(np.zeros((6, 6)), np.zeros((6, 6)), np.zeros((2, 6, 6)), spec)) == 0


def test_extract_peaks_reads_offset_and_size_at_the_peak():
    stride = 4
    hm = np.zeros((10, 12), np.float32)
    size = np.full((10, 12), 99.0, np.float32)
    off = np.zeros((2, 10, 12), np.float32)
    hm[6, 2] = 0.8
    size[6, 2] = 7.5
    off[:, 6, 2] = (0.25, -0.375)
    (p,) = extract_peaks(hm, size, off, DecodeSpec(stride=stride))
    assert (p["i"], p["j"]) == (6, 2)
    assert (p["row"], p["col"]) == grid_to_input(6, 2, 0.25, -0.375, stride)
    assert p["row"] == (6 + 0.25) * 4 + 1.5 and p["col"] == (2 - 0.375) * 4 + 1.5
    assert p["diameter"] == 7.5


def test_extract_peaks_rejects_mismatched_shapes():
    spec = DecodeSpec()
    with pytest.raises(ValueError, match="size"):
        extract_peaks(np.zeros((4, 5)), np.zeros((5, 4)), np.zeros((2, 4, 5)), spec)
    with pytest.raises(ValueError, match="offset"):
        extract_peaks(np.zeros((4, 5)), np.zeros((4, 5)), np.zeros((1, 4, 5)), spec)
    with pytest.raises(ValueError, match="heatmap"):
        extract_peaks(np.zeros((1, 4, 5)), np.zeros((4, 5)), np.zeros((2, 4, 5)), spec)


def test_extract_peaks_batch_matches_per_slice():
    rng = np.random.default_rng(2)
    hm = rng.random((3, 1, 12, 10)).astype(np.float32)
    size = rng.random((3, 1, 12, 10)).astype(np.float32)
    off = rng.random((3, 2, 12, 10)).astype(np.float32) - 0.5
    spec = DecodeSpec(score_threshold=0.5)
    batch = extract_peaks_batch(hm, size, off, spec)
    assert len(batch) == 3
    for n in range(3):
        np.testing.assert_array_equal(batch[n], extract_peaks(hm[n, 0], size[n, 0], off[n], spec))


# --- detections_to_patient --------------------------------------------------------------------


def _rotation(a, b, c):
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


def _geometry(oblique):
    rot = _rotation(0.3, -0.25, 0.4) if oblique else np.eye(3)
    return SliceGeometry(
        rows=300,
        columns=420,
        pixel_spacing=(0.7, 0.85),
        position=(-150.0, -120.0, 37.5),
        row_direction=tuple(rot[:, 0]),
        column_direction=tuple(rot[:, 1]),
    )


@pytest.mark.parametrize("pixel_size_mm", [None, 0.9])
@pytest.mark.parametrize("oblique", [False, True])
def test_detections_to_patient_roundtrip_is_exact(pixel_size_mm, oblique):
    geom = _geometry(oblique)
    pre = PreprocessSpec(out_height=96, out_width=128, pixel_size_mm=pixel_size_mm)
    res = pre.resample_geometry(geom.rows, geom.columns, geom.pixel_spacing)
    spec = DecodeSpec(stride=4, score_threshold=0.1)
    h, w = pre.out_height // spec.stride, pre.out_width // spec.stride
    rng = np.random.default_rng(3)

    # true source points, spread over the model's field of view
    q_rows = (np.array([0.15, 0.4, 0.65, 0.85, 0.3]) * pre.out_height) + rng.uniform(-2, 2, 5)
    q_cols = (np.array([0.2, 0.8, 0.35, 0.6, 0.9]) * pre.out_width) + rng.uniform(-2, 2, 5)
    src_r, src_c = res.to_source(q_rows, q_cols)
    diam_mm = rng.uniform(3.0, 25.0, 5)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])

    # encode them as the network would predict them
    mm_per_px = 0.5 * (res.scale_y * geom.pixel_spacing[0] + res.scale_x * geom.pixel_spacing[1])
    y_in, x_in = res.to_output(src_r, src_c)
    i, j, dy, dx = input_to_grid(y_in, x_in, spec.stride)
    hm = np.zeros((h, w), np.float32)
    size = np.zeros((h, w), np.float32)
    off = np.zeros((2, h, w), np.float32)
    hm[i, j] = scores
    size[i, j] = diam_mm / mm_per_px
    off[0, i, j], off[1, i, j] = dy, dx

    dets = detections_to_patient(extract_peaks(hm, size, off, spec), res, geom)
    assert len(dets) == 5
    got = np.array([[d.x, d.y, d.z] for d in dets])
    np.testing.assert_allclose(got, geom.pixel_to_patient(src_r, src_c), rtol=0, atol=1e-4)
    np.testing.assert_allclose([d.row for d in dets], src_r, atol=1e-5)
    np.testing.assert_allclose([d.col for d in dets], src_c, atol=1e-5)
    np.testing.assert_allclose([d.diameter_mm for d in dets], diam_mm, rtol=1e-6)
    np.testing.assert_allclose([d.score for d in dets], scores, rtol=1e-6)
    assert all(d.slice_location == pytest.approx(geom.slice_location) for d in dets)
    # every detection lies in the slice plane
    np.testing.assert_allclose(got @ geom.normal, geom.slice_location, atol=1e-6)


@pytest.mark.parametrize("oblique", [False, True])
def test_whole_image_resize_maps_centre_to_centre_and_scales_diameter(oblique):
    # independent of ResampleGeometry's formulas: the model-input centre is the image centre,
    # and one model-input pixel spans field-of-view / out-size mm.
    geom = _geometry(oblique)
    pre = PreprocessSpec(out_height=96, out_width=128)
    res = pre.resample_geometry(geom.rows, geom.columns, geom.pixel_spacing)
    peaks = np.zeros(1, PEAK_DTYPE)
    peaks["row"], peaks["col"], peaks["diameter"], peaks["score"] = (96 - 1) / 2, (128 - 1) / 2, 4.0, 0.9
    (det,) = detections_to_patient(peaks, res, geom, slice_location=12.5)
    centre = geom.pixel_to_patient((geom.rows - 1) / 2, (geom.columns - 1) / 2)
    np.testing.assert_allclose([det.x, det.y, det.z], centre, atol=1e-9)
    fov_px_mm = 0.5 * (geom.rows * 0.7 / 96 + geom.columns * 0.85 / 128)
    assert det.diameter_mm == pytest.approx(4.0 * fov_px_mm)
    assert det.slice_location == 12.5
