"""A coarse 3-D map of the lungs: where to grow vessels and place nodules."""

import cv2
import numpy as np

from edge.phantom.anatomy import Anatomy, AnatomyPlane


class LungMap:
    """Lung membership and depth below the pleura on a coarse isotropic grid.

    ``depth`` is the 3-D distance (mm) from a lung voxel to the nearest
    non-lung voxel; ``wall_depth`` the in-plane distance to the chest wall
    (inner ribcage), used to tell pleural from mediastinal surfaces.
    """

    def __init__(self, anatomy: Anatomy, step: float = 3.0, max_depth: float = 30.0):
        a = anatomy
        self.step = float(step)
        self.side_x = a.med_x
        margin = 10.0
        self.xs = np.arange(a.cx - a.body_a - margin, a.cx + a.body_a + margin, step, dtype=np.float32)
        self.ys = np.arange(a.cy - a.body_b_front - margin, a.cy + a.body_b_back + margin, step, dtype=np.float32)
        self.zs = np.arange(a.z_recess - 2 * step, a.z_apex + 2 * step, step, dtype=np.float32)
        plane = AnatomyPlane(a, self.xs, self.ys, soft=step)
        lung = np.zeros((len(self.zs), len(self.ys), len(self.xs)), bool)
        wall = np.zeros(lung.shape, np.float32)
        for k, z in enumerate(self.zs):
            cavity = plane.polar.occupancy(a.cavity_table(float(z)), step)
            lung[k] = plane.lung_occupancy(float(z), cavity) > 0.5
            wall[k] = cv2.distanceTransform((cavity > 0.5).astype(np.uint8), cv2.DIST_L2, 5) * step
        self.lung = lung
        self._x0, self._y0, self._z0 = float(self.xs[0]), float(self.ys[0]), float(self.zs[0])
        self.wall_depth = wall
        self.depth = self._depth_3d(max_depth)

    def _depth_3d(self, max_depth: float) -> np.ndarray:
        d2 = np.zeros(self.lung.shape, np.float32)
        for k in range(len(self.zs)):
            m = np.pad(self.lung[k].astype(np.uint8), 1)
            d2[k] = cv2.distanceTransform(m, cv2.DIST_L2, 5)[1:-1, 1:-1] * self.step
        out = d2.copy()
        reach = int(np.ceil(max_depth / self.step))
        n = len(self.zs)
        for dz in range(1, reach + 1):
            off = np.float32(dz * self.step)
            # beyond the map's top and bottom there is no lung
            out[:dz] = np.minimum(out[:dz], off)
            out[n - dz:] = np.minimum(out[n - dz:], off)
            if dz < n:
                np.minimum(out[dz:], np.sqrt(d2[:-dz] ** 2 + off * off), out=out[dz:])
                np.minimum(out[:-dz], np.sqrt(d2[dz:] ** 2 + off * off), out=out[:-dz])
        out[~self.lung] = 0.0
        return out

    def _index(self, points):
        p = np.atleast_2d(np.asarray(points, np.float64))
        ix = np.round((p[:, 0] - self.xs[0]) / self.step).astype(int)
        iy = np.round((p[:, 1] - self.ys[0]) / self.step).astype(int)
        iz = np.round((p[:, 2] - self.zs[0]) / self.step).astype(int)
        ok = (ix >= 0) & (ix < len(self.xs)) & (iy >= 0) & (iy < len(self.ys)) & (iz >= 0) & (iz < len(self.zs))
        return np.clip(iz, 0, len(self.zs) - 1), np.clip(iy, 0, len(self.ys) - 1), np.clip(ix, 0, len(self.xs) - 1), ok

    def contains_point(self, p) -> bool:
        """Scalar :meth:`contains` for one point (fast path for tree growth)."""
        ix = int(round((p[0] - self._x0) / self.step))
        iy = int(round((p[1] - self._y0) / self.step))
        iz = int(round((p[2] - self._z0) / self.step))
        nz, ny, nx = self.lung.shape
        return 0 <= ix < nx and 0 <= iy < ny and 0 <= iz < nz and bool(self.lung[iz, iy, ix])

    def contains(self, points) -> np.ndarray:
        iz, iy, ix, ok = self._index(points)
        return self.lung[iz, iy, ix] & ok

    def depth_at(self, points) -> np.ndarray:
        iz, iy, ix, ok = self._index(points)
        return np.where(ok, self.depth[iz, iy, ix], 0.0)

    def wall_depth_at(self, points) -> np.ndarray:
        iz, iy, ix, ok = self._index(points)
        return np.where(ok, self.wall_depth[iz, iy, ix], 0.0)

    def voxel_centres(self, mask: np.ndarray) -> np.ndarray:
        iz, iy, ix = np.nonzero(mask)
        return np.stack([self.xs[ix], self.ys[iy], self.zs[iz]], axis=1).astype(np.float64)

    def sample(self, rng: np.random.Generator, n: int, side: int = 0, min_depth: float = 0.0,
               z_range=None) -> np.ndarray:
        """``n`` random points in the lungs (side -1 right, +1 left, 0 both), jittered within voxels."""
        mask = self.lung & (self.depth >= min_depth)
        if side:
            right = (self.xs < self.side_x)[None, None, :]
            mask = mask & (right if side < 0 else ~right)
        if z_range is not None:
            zok = (self.zs >= z_range[0]) & (self.zs <= z_range[1])
            mask = mask & zok[:, None, None]
        centres = self.voxel_centres(mask)
        if len(centres) == 0:
            return np.zeros((0, 3))
        pick = rng.integers(0, len(centres), n)
        return centres[pick] + rng.uniform(-0.5, 0.5, (n, 3)) * self.step
