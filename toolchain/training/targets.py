"""CenterNet training targets for one slice.

Each nodule crossing the slice is drawn as a Gaussian peak at its centre cell
on the output grid (stride from :mod:`edge.decode.peaks`, the same mapping the
runtime inverts). Nodules whose cross-section on this slice is small (the slice
only grazes the sphere) become *ignore* regions: the network is neither
rewarded nor punished there, since a thin cap of a nodule and a vessel look alike.
"""

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge.decode.peaks import input_to_grid

# A slice through a sphere at |dz| <= CORE_FRACTION * r shows a cross-section of
# radius >= sqrt(1 - 0.7^2) r ~ 0.71 r: clearly a nodule, a positive target.
CORE_FRACTION = 0.7


@dataclass(frozen=True)
class SliceNodule:
    """A nodule as seen from one slice, in model-input pixels."""

    y: float
    x: float
    diameter_px: float
    dz_fraction: float  # |slice z - nodule z| / radius


@dataclass
class SliceTargets:
    heatmap: np.ndarray  # (h, w) float32 in [0, 1]
    size: np.ndarray  # (h, w) diameter in model-input pixels, at centre cells
    offset: np.ndarray  # (2, h, w)
    reg_mask: np.ndarray  # (h, w) 1 at centre cells of positive nodules
    weight: np.ndarray  # (h, w) 0 in ignore regions, else 1


def gaussian_sigma(diameter_cells: float) -> float:
    return max(diameter_cells / 6.0, 0.6)


def make_slice_targets(nodules: Sequence[SliceNodule], height: int, width: int, stride: int) -> SliceTargets:
    """Targets on the (height/stride, width/stride) grid for a model-input of (height, width)."""
    h, w = height // stride, width // stride
    hm = np.zeros((h, w), np.float32)
    size = np.zeros((h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    reg = np.zeros((h, w), np.float32)
    weight = np.ones((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for n in nodules:
        i, j, dy, dx = input_to_grid(n.y, n.x, stride)
        d_cells = n.diameter_px / stride
        if n.dz_fraction > 1.0:
            continue
        if n.dz_fraction > CORE_FRACTION:
            r = max(d_cells / 2.0, 1.0) + 1.0
            weight[(yy - (i + dy)) ** 2 + (xx - (j + dx)) ** 2 <= r * r] = 0.0
            continue
        if not (0 <= i < h and 0 <= j < w):
            continue
        s = gaussian_sigma(d_cells)
        g = np.exp(-((yy - i) ** 2 + (xx - j) ** 2) / (2 * s * s))
        np.maximum(hm, g, out=hm)
        hm[i, j] = 1.0
        size[i, j] = n.diameter_px
        offset[:, i, j] = (dy, dx)
        reg[i, j] = 1.0
    weight[hm > 0.5] = 1.0  # a positive core always counts, even inside another nodule's ignore ring
    return SliceTargets(hm, size, offset, reg, weight)
