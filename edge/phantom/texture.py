"""Smooth random fields: tissue texture that is coherent from slice to slice."""

import cv2
import numpy as np


class SmoothField:
    """A unit-variance random field over a 3-D box, correlated over ``cell_mm``.

    Drawn once on a coarse grid and sampled plane by plane (linear in z
    and in-plane), so neighbouring slices see the same structures.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, cell_mm: float):
        self.lo = np.asarray(lo, np.float64)
        self.cell = float(cell_mm)
        shape = np.ceil((np.asarray(hi, np.float64) - self.lo) / self.cell).astype(int) + 4
        nx, ny, nz = (int(v) for v in shape)
        noise = rng.standard_normal((nz, ny, nx)).astype(np.float32)
        for k in range(nz):
            noise[k] = cv2.GaussianBlur(noise[k], (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
        noise[1:-1] = 0.25 * noise[:-2] + 0.5 * noise[1:-1] + 0.25 * noise[2:]
        noise -= noise.mean()
        noise /= noise.std() + 1e-6
        self.data = noise
        self._maps = {}

    def plane(self, z: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The field on the plane at ``z`` sampled at columns ``xs`` and rows ``ys`` (mm)."""
        fz = (z - self.lo[2]) / self.cell
        k = int(np.clip(np.floor(fz), 0, self.data.shape[0] - 2))
        w = np.float32(np.clip(fz - k, 0.0, 1.0))
        coarse = self.data[k] * (1 - w) + self.data[k + 1] * w
        key = (len(xs), len(ys), float(xs[0]), float(ys[0]), float(xs[-1]), float(ys[-1]))
        maps = self._maps.get(key)
        if maps is None:
            mx = ((np.asarray(xs, np.float64) - self.lo[0]) / self.cell).astype(np.float32)
            my = ((np.asarray(ys, np.float64) - self.lo[1]) / self.cell).astype(np.float32)
            maps = (np.broadcast_to(mx[None, :], (len(ys), len(xs))).copy(),
                    np.broadcast_to(my[:, None], (len(ys), len(xs))).copy())
            self._maps[key] = maps
        return cv2.remap(coarse, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
