import numpy as np
import pytest

from edge.errors import ConfigError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess.reference import (
    preprocess_frame_reference,
    resample_bilinear,
    stack_slices,
    window_to_unit_range,
)
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec, ResampleGeometry, Window


def make_frame(pixels, slope=1.0, intercept=0.0, padding=None, spacing=(1.0, 1.0)):
    rows, cols = pixels.shape
    return CTFrame(pixels, slope, intercept, SliceGeometry(rows, cols, spacing, (0.0, 0.0, 0.0)), padding=padding)


def test_window_maps_low_high_and_clips():
    w = Window(level=40.0, width=400.0)
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(window_to_unit_range(hu, w), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_identity_geometry_returns_image():
    img = np.random.default_rng(0).random((7, 5))
    out = resample_bilinear(img, ResampleGeometry(1.0, 0.0, 1.0, 0.0), 7, 5, fill=-1.0)
    np.testing.assert_array_equal(out, img)


def test_half_size_resize_averages_2x2_blocks():
    img = np.random.default_rng(1).random((8, 6))
    spec = PreprocessSpec(out_height=4, out_width=3)
    out = resample_bilinear(img, spec.resample_geometry(8, 6), 4, 3, fill=0.0)
    np.testing.assert_allclose(out, img.reshape(4, 2, 3, 2).mean(axis=(1, 3)), atol=1e-15)


def test_upsampling_is_exact_on_a_linear_ramp_and_clamps_at_edges():
    rows, cols = 6, 4
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    img = 3.0 * y + 2.0 * x
    spec = PreprocessSpec(out_height=15, out_width=9)
    geom = spec.resample_geometry(rows, cols)
    out = resample_bilinear(img, geom, 15, 9, fill=np.nan)
    sy, sx = geom.to_source(np.arange(15)[:, None], np.arange(9)[None, :])
    expected = 3.0 * np.clip(sy, 0, rows - 1) + 2.0 * np.clip(sx, 0, cols - 1)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    # upsampling samples reach beyond the outer pixel centres: those clamp to the edge value
    assert sy[0, 0] < 0 and out[0, 0] == img[0, 0]


def test_matches_torch_interpolate_align_corners_false():
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(2).random((37, 23))
    for out_h, out_w in [(16, 10), (80, 51), (37, 23)]:
        spec = PreprocessSpec(out_height=out_h, out_width=out_w)
        ours = resample_bilinear(img, spec.resample_geometry(37, 23), out_h, out_w, fill=0.0)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(img)[None, None], size=(out_h, out_w), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_samples_beyond_half_a_pixel_are_fill():
    img = np.arange(16, dtype=np.float64).reshape(4, 4)
    # coordinates -1.0, -0.5, 0.0, ..., 3.5, 4.0 along x; y = 1
    geom = ResampleGeometry(1.0, 1.0, 0.5, -1.0)
    out = resample_bilinear(img, geom, 1, 11, fill=-7.0)[0]
    assert out[0] == -7.0  # x = -1.0: outside
    assert out[1] == img[1, 0]  # x = -0.5: inside, clamped
    assert out[3] == pytest.approx(img[1, 0] + 0.5)
    assert out[9] == img[1, 3]  # x = 3.5: inside, clamped
    assert out[10] == -7.0  # x = 4.0: outside


def test_physical_pixel_size_is_centred_and_fills_outside():
    rows = cols = 8
    img = np.ones((rows, cols))
    spec = PreprocessSpec(out_height=8, out_width=8, pixel_size_mm=2.0)
    geom = spec.resample_geometry(rows, cols, (0.5, 0.5))  # 4 source pixels per output pixel
    assert geom.scale_y == 4.0
    cy, cx = geom.to_source((spec.out_height - 1) / 2, (spec.out_width - 1) / 2)
    assert (cy, cx) == ((rows - 1) / 2, (cols - 1) / 2)
    out = resample_bilinear(img, geom, 8, 8, fill=0.0)
    # source coordinates 3.5 + 4 * (i - 3.5): only i = 3, 4 (coords 1.5, 5.5) fall inside
    inside = np.zeros(8, bool)
    inside[[3, 4]] = True
    np.testing.assert_array_equal(out, np.outer(inside, inside).astype(float))


def test_padding_is_masked_before_rescale():
    pixels = np.array([[0, 10], [20, 30]], dtype=np.uint16)
    # stored 0 with intercept -1024 would be air anyway; make padding map to tissue instead
    frame = make_frame(pixels, slope=10.0, intercept=0.0, padding=(20, 25))
    spec = PreprocessSpec(windows=(Window(100.0, 200.0),), out_height=2, out_width=2, fill_hu=-1024.0)
    out = preprocess_frame_reference(frame, spec)
    # HU: 0, 100, (200 -> padding -> -1024), 300
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.0, 1.0]])


def test_windows_order_and_normalization():
    pixels = np.full((4, 4), 1064, dtype=np.int16)  # 40 HU with intercept -1024
    frame = make_frame(pixels, intercept=-1024.0)
    windows = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"], WINDOW_PRESETS["bone"])
    spec = PreprocessSpec(windows=windows, out_height=2, out_width=2, mean=0.25, std=0.5)
    out = preprocess_frame_reference(frame, spec)
    assert out.shape == (3, 2, 2) and out.dtype == np.float64
    units = [(40.0 - w.low) / w.width for w in windows]
    np.testing.assert_allclose(out[:, 0, 0], [(u - 0.25) / 0.5 for u in units])


def test_signed_and_unsigned_storage_give_the_same_hu():
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 2000, (6, 6))
    signed = make_frame(hu.astype(np.int16))
    unsigned = make_frame((hu + 1024).astype(np.uint16), intercept=-1024.0)
    spec = PreprocessSpec(out_height=3, out_width=3)
    np.testing.assert_allclose(preprocess_frame_reference(signed, spec), preprocess_frame_reference(unsigned, spec))


def test_stack_slices_is_slice_major_in_spec_dtype():
    spec = PreprocessSpec(windows=(WINDOW_PRESETS["lung"], WINDOW_PRESETS["bone"]), slices=3, out_height=2,
                          out_width=2, dtype="float16")
    planes = [np.full((2, 2, 2), 10.0 * s) + np.arange(2)[:, None, None] for s in range(3)]
    x = stack_slices(planes, spec)
    assert x.shape == (1, 6, 2, 2) and x.dtype == np.float16
    np.testing.assert_array_equal(x[0, :, 0, 0], [0, 1, 10, 11, 20, 21])


def test_stack_slices_rejects_wrong_count():
    spec = PreprocessSpec(slices=3, out_height=2, out_width=2)
    with pytest.raises(ConfigError, match="slices"):
        stack_slices([np.zeros((1, 2, 2))] * 2, spec)
