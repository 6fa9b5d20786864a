"""Float64 NumPy reference of the preprocessing spec: the ground truth for tests.

Written for clarity, not speed. Every step follows :mod:`edge.preprocess.spec`
literally: stored value -> padding mask -> HU -> window + clip -> bilinear
resample -> normalize.

Edge rule: a sample at source coordinate ``y`` (likewise ``x``) is inside the
image when ``-0.5 <= y <= rows - 0.5`` (within half a pixel of the outermost
pixel centres, bounds included); inside samples clamp the coordinate to
``[0, rows - 1]`` (edge value), outside samples take the windowed ``fill_hu``.
"""

from typing import Sequence

import numpy as np

from edge.errors import ConfigError
from edge.frame import CTFrame
from edge.preprocess.spec import PreprocessSpec, ResampleGeometry, Window


def window_to_unit_range(hu, window: Window) -> np.ndarray:
    """Map HU linearly from [window.low, window.high] to [0, 1], clipping outside values."""
    hu = np.asarray(hu, dtype=np.float64)
    return np.clip((hu - window.low) / window.width, 0.0, 1.0)


def _axis_samples(n_in: int, n_out: int, scale: float, offset: float):
    """Per output index along one axis: lower neighbour, upper neighbour, upper weight, inside flag."""
    coord = np.arange(n_out, dtype=np.float64) * scale + offset
    inside = (coord >= -0.5) & (coord <= n_in - 0.5)
    clamped = np.clip(coord, 0.0, n_in - 1.0)
    lower = np.floor(clamped).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    weight = clamped - lower
    return lower, upper, weight, inside


def resample_bilinear(img, geom: ResampleGeometry, out_h: int, out_w: int, fill: float) -> np.ndarray:
    """Bilinear sample of a 2-D image on the output grid described by ``geom``.

    Output pixel (i, j) samples source coordinate ``geom.to_source(i, j)``;
    samples outside the image (see module docstring) are ``fill``.
    """
    img = np.asarray(img, dtype=np.float64)
    rows, cols = img.shape
    y0, y1, wy, inside_y = _axis_samples(rows, out_h, geom.scale_y, geom.offset_y)
    x0, x1, wx, inside_x = _axis_samples(cols, out_w, geom.scale_x, geom.offset_x)
    wy = wy[:, None]
    wx = wx[None, :]
    top = img[y0][:, x0] * (1.0 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1.0 - wx) + img[y1][:, x1] * wx
    out = top * (1.0 - wy) + bottom * wy
    out[~(inside_y[:, None] & inside_x[None, :])] = fill
    return out


def frame_hu(frame: CTFrame, fill_hu: float) -> np.ndarray:
    """HU of the stored pixels in float64; padding pixels become ``fill_hu``."""
    stored = np.asarray(frame.pixels)
    hu = stored.astype(np.float64) * float(frame.rescale_slope) + float(frame.rescale_intercept)
    if frame.padding is not None:
        lo, hi = frame.padding
        hu[(stored >= lo) & (stored <= hi)] = fill_hu
    return hu


def preprocess_frame_reference(frame: CTFrame, spec: PreprocessSpec) -> np.ndarray:
    """One frame -> its normalized planes, shape (n_windows, out_height, out_width), float64."""
    rows, cols = np.asarray(frame.pixels).shape
    geom = spec.resample_geometry(rows, cols, frame.geometry.pixel_spacing)
    hu = frame_hu(frame, spec.fill_hu)
    planes = []
    for window in spec.windows:
        unit = window_to_unit_range(hu, window)
        fill = float(window_to_unit_range(spec.fill_hu, window))
        resampled = resample_bilinear(unit, geom, spec.out_height, spec.out_width, fill)
        planes.append((resampled - spec.mean) / spec.std)
    return np.stack(planes)


def stack_slices(planes_list: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Stack the planes of ``spec.slices`` adjacent slices into the network input (1, C, H, W).

    Channel order is slice-major: channel = slice_index * n_windows + window_index.
    """
    if len(planes_list) != spec.slices:
        raise ConfigError(f"preprocess.slices is {spec.slices} but {len(planes_list)} slice(s) were given")
    stacked = np.concatenate([np.asarray(p) for p in planes_list], axis=0)
    return stacked[None].astype(spec.dtype)
