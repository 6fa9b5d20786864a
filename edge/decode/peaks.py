"""Per-slice decoding: heatmap/size/offset maps -> peaks -> detections in patient mm.

Grid convention (shared with the training targets): output cell (i, j) pools the
``stride`` x ``stride`` block of model-input pixels starting at (i * stride, j * stride),
so its centre is model-input pixel ``i * stride + (stride - 1) / 2`` (integer
coordinates are pixel centres, as in edge/preprocess/spec.py). The predicted
offset (dy, dx) is in cells, relative to that centre, and lies in [-0.5, 0.5)
for a point inside the cell. :func:`grid_to_input` and :func:`input_to_grid` are
exact inverses.
"""

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from edge.decode.spec import DecodeSpec
from edge.geometry import SliceGeometry
from edge.preprocess.spec import ResampleGeometry

# One row per peak, best first. row/col/diameter are in model-input pixels.
PEAK_DTYPE = np.dtype(
    [("score", "f4"), ("i", "i4"), ("j", "i4"), ("row", "f8"), ("col", "f8"), ("diameter", "f8")]
)


def grid_to_input(i, j, dy, dx, stride: int):
    """Model-input pixel (y, x) of output cell (i, j) plus offset (dy, dx) cells; broadcasts."""
    half = (stride - 1) / 2.0
    return (np.asarray(i) + dy) * stride + half, (np.asarray(j) + dx) * stride + half


def input_to_grid(y, x, stride: int):
    """Inverse of :func:`grid_to_input`: the cell (i, j) containing model-input pixel (y, x),
    and the offset (dy, dx) in [-0.5, 0.5) from its centre. Broadcasts; scalars in, scalars out."""
    half = (stride - 1) / 2.0
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    i = np.floor((y + 0.5) / stride)
    j = np.floor((x + 0.5) / stride)
    dy = (y - half) / stride - i
    dx = (x - half) / stride - j
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    if i.ndim == 0 and j.ndim == 0:
        return int(i), int(j), float(dy), float(dx)
    return i, j, dy, dx


def local_maxima(heatmap: np.ndarray, kernel: int) -> np.ndarray:
    """Boolean mask of cells equal to the max of their kernel x kernel neighbourhood.

    Works on the last two axes. Outside the image counts as -inf, so border peaks
    are kept. Of equal neighbouring maxima (a plateau, e.g. saturated float16
    sigmoids) only the first in raster order within each other's window is kept.
    """
    hm = np.asarray(heatmap, np.float32)
    if kernel == 1:
        return np.ones(hm.shape, bool)
    r = kernel // 2
    h, w = hm.shape[-2:]
    lead = [(0, 0)] * (hm.ndim - 2)
    padded = np.pad(hm, lead + [(r, r), (r, r)], constant_values=-np.inf)
    # separable sliding max: a loop over kernel offsets, never over pixels
    rows_max = padded[..., :, 0:w]
    for d in range(1, kernel):
        rows_max = np.maximum(rows_max, padded[..., :, d : d + w])
    win_max = rows_max[..., 0:h, :]
    for d in range(1, kernel):
        win_max = np.maximum(win_max, rows_max[..., d : d + h, :])
    is_max = hm == win_max

    # tie-break: drop a maximum if an equal maximum sits earlier in raster order
    pad_max = np.pad(is_max, lead + [(r, r), (r, r)], constant_values=False)
    keep = is_max.copy()
    for oy in range(-r, 1):
        for ox in range(-r, r + 1):
            if oy == 0 and ox >= 0:
                break
            other_max = pad_max[..., r + oy : r + oy + h, r + ox : r + ox + w]
            other_val = padded[..., r + oy : r + oy + h, r + ox : r + ox + w]
            keep &= ~(other_max & (other_val == hm))
    return keep


def _check_maps(heatmap, size, offset):
    heatmap = np.asarray(heatmap)
    size = np.asarray(size)
    offset = np.asarray(offset)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got shape {heatmap.shape}")
    if size.shape != heatmap.shape:
        raise ValueError(f"size must have the heatmap's shape {heatmap.shape}, got {size.shape}")
    if offset.shape != (2,) + heatmap.shape:
        raise ValueError(f"offset must be (2, {heatmap.shape[0]}, {heatmap.shape[1]}), got {offset.shape}")
    return heatmap, size, offset


def extract_peaks(heatmap, size, offset, spec: DecodeSpec) -> np.ndarray:
    """Peaks of one slice's maps as a :data:`PEAK_DTYPE` array, highest score first.

    ``heatmap`` and ``size`` are (h, w), ``offset`` is (2, h, w) = (dy, dx) in cells.
    Shape mismatches raise ValueError: they are a model/runtime mismatch, not user input.
    """
    heatmap, size, offset = _check_maps(heatmap, size, offset)
    hm = heatmap.astype(np.float32, copy=False)
    candidates = local_maxima(hm, spec.nms_kernel) & (hm >= spec.score_threshold)
    flat = np.flatnonzero(candidates)
    scores = hm.ravel()[flat]
    k = spec.max_detections_per_slice
    if flat.size > k:
        top = np.argpartition(-scores, k - 1)[:k]
        flat, scores = flat[top], scores[top]
    order = np.lexsort((flat, -scores))  # score descending, raster order on ties
    flat, scores = flat[order], scores[order]

    i, j = np.divmod(flat, hm.shape[1])
    peaks = np.empty(flat.size, PEAK_DTYPE)
    peaks["score"] = scores
    peaks["i"] = i
    peaks["j"] = j
    dy = offset[0].ravel()[flat].astype(np.float64)
    dx = offset[1].ravel()[flat].astype(np.float64)
    peaks["row"], peaks["col"] = grid_to_input(i, j, dy, dx, spec.stride)
    peaks["diameter"] = size.ravel()[flat]
    return peaks


def extract_peaks_batch(heatmap, size, offset, spec: DecodeSpec) -> List[np.ndarray]:
    """:func:`extract_peaks` for batched model outputs: heatmap/size (N, 1, h, w), offset (N, 2, h, w)."""
    heatmap = np.asarray(heatmap)
    size = np.asarray(size)
    if heatmap.ndim != 4 or heatmap.shape[1] != 1:
        raise ValueError(f"heatmap must be (N, 1, h, w), got shape {heatmap.shape}")
    if size.ndim != 4 or size.shape[1] != 1:
        raise ValueError(f"size must be (N, 1, h, w), got shape {size.shape}")
    return [extract_peaks(heatmap[n, 0], size[n, 0], offset[n], spec) for n in range(heatmap.shape[0])]


@dataclass(frozen=True)
class SliceDetection:
    """One detection on one slice, in patient space (DICOM LPS, mm)."""

    x: float
    y: float
    z: float
    diameter_mm: float
    score: float
    slice_location: float  # position of the slice along its normal (SliceGeometry.slice_location)
    row: float  # fractional source pixel
    col: float


def detections_to_patient(
    peaks: np.ndarray,
    resample: ResampleGeometry,
    geometry: SliceGeometry,
    slice_location: Optional[float] = None,
) -> List[SliceDetection]:
    """Map peaks from model-input pixels to patient mm, undoing the resample exactly.

    ``resample`` must be the geometry the slice was preprocessed with
    (``PreprocessSpec.resample_geometry(geometry.rows, geometry.columns, geometry.pixel_spacing)``).
    The diameter is scaled by the mean of the row and column pixel sizes of the model input.
    """
    src_row, src_col = resample.to_source(peaks["row"], peaks["col"])
    xyz = geometry.pixel_to_patient(src_row, src_col)
    mm_per_input_px = 0.5 * (
        resample.scale_y * float(geometry.pixel_spacing[0]) + resample.scale_x * float(geometry.pixel_spacing[1])
    )
    diameters = peaks["diameter"] * mm_per_input_px
    loc = geometry.slice_location if slice_location is None else float(slice_location)
    return [
        SliceDetection(
            x=float(p[0]),
            y=float(p[1]),
            z=float(p[2]),
            diameter_mm=float(d),
            score=float(s),
            slice_location=loc,
            row=float(r),
            col=float(c),
        )
        for p, d, s, r, c in zip(xyz, diameters, peaks["score"], src_row, src_col)
    ]
