"""Geometric primitives of the phantom, rasterised as anti-aliased occupancy.

Occupancy is the fraction of a sample's footprint inside a shape, in [0, 1].
Edges are softened over one pixel (``soft`` mm) so that a shape looks the same
wherever it falls on the grid; the scanner's kernel blur comes on top.

Coordinates are patient millimetres (LPS). A plane is sampled on separable
1-D axes: ``xs`` (one value per column) and ``ys`` (one per row).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

N_ANGLES = 1440  # resolution of polar radius tables


def soft_step(signed_mm, soft: float) -> np.ndarray:
    """Occupancy from a signed depth (mm, > 0 inside), ramped over ``soft`` mm."""
    out = np.asarray(signed_mm, np.float32) * np.float32(1.0 / soft) + np.float32(0.5)
    if out.ndim == 0:
        return np.float32(min(max(float(out), 0.0), 1.0))
    return np.clip(out, 0.0, 1.0, out=out)


def smoothstep(x) -> np.ndarray:
    """Cubic 0 -> 1 ramp on [0, 1] (clamped outside)."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def superellipse_radius(theta: np.ndarray, a: float, b_front: float, b_back: float, n: float) -> np.ndarray:
    """Polar radius of a superellipse; ``b_front`` for y < 0 (anterior), ``b_back`` for y > 0."""
    c = np.abs(np.cos(theta))
    s = np.sin(theta)
    b = np.where(s < 0, b_front, b_back)
    return (c ** n / a ** n + np.abs(s) ** n / b ** n) ** (-1.0 / n)


def table_angles() -> np.ndarray:
    """Angles (radians, [-pi, pi)) at which polar radius tables are sampled."""
    return np.linspace(-np.pi, np.pi, N_ANGLES, endpoint=False)


class PolarFrame:
    """Polar coordinates of a plane's samples around one centre, computed once.

    A closed shape is then a radius table over :func:`table_angles`; its
    occupancy is one table look-up and one comparison per pixel.
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float):
        dx = (np.asarray(xs, np.float32) - np.float32(cx))[None, :]
        dy = (np.asarray(ys, np.float32) - np.float32(cy))[:, None]
        self.rho = np.sqrt(dx * dx + dy * dy).astype(np.float32)
        theta = np.arctan2(dy, dx)
        idx = np.round((theta + np.pi) * (N_ANGLES / (2 * np.pi))).astype(np.int32)
        self.angle_index = np.mod(idx, N_ANGLES).astype(np.int32)
        self.theta = theta.astype(np.float32)

    def radius(self, table: np.ndarray) -> np.ndarray:
        """Per-sample radius of a shape given its radius table."""
        return np.take(np.asarray(table, np.float32), self.angle_index)

    def occupancy(self, table: np.ndarray, soft: float, inset=0.0) -> np.ndarray:
        """Occupancy of the shape ``rho < table(theta) - inset``."""
        return soft_step(self.radius(table) - inset - self.rho, soft)


def ellipse_occupancy(xs, ys, cx, cy, ax, ay, soft, angle=0.0, out=None, value=1.0):
    """Occupancy of an ellipse (semi-axes ax, ay, rotated by ``angle``), on its bounding box.

    With ``out`` given, writes ``max(out, value * occupancy)`` into it and returns it;
    otherwise returns a full-plane array.
    """
    if out is None:
        out = np.zeros((len(ys), len(xs)), np.float32)
    if min(ax, ay) < 1e-3:
        return out
    r = max(ax, ay) + soft
    box = _box(xs, ys, cx - r, cx + r, cy - r, cy + r)
    if box is None:
        return out
    (r0, r1), (c0, c1) = box
    dx = xs[c0:c1][None, :] - cx
    dy = ys[r0:r1][:, None] - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u = (dx * ca + dy * sa) / ax
    v = (-dx * sa + dy * ca) / ay
    q = np.sqrt(u * u + v * v) + np.float32(1e-6)
    # radial depth below the boundary in mm: rho * (1/q - 1)
    depth = np.sqrt(dx * dx + dy * dy) * (1.0 / q - 1.0)
    occ = soft_step(depth, soft) * np.float32(value)
    np.maximum(out[r0:r1, c0:c1], occ, out=out[r0:r1, c0:c1])
    return out


def _box(xs, ys, x0, x1, y0, y1) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Row and column index ranges of a patient-mm box on ascending uniform axes."""
    c0, c1 = _range(xs, x0, x1)
    r0, r1 = _range(ys, y0, y1)
    if c0 >= c1 or r0 >= r1:
        return None
    return (r0, r1), (c0, c1)


def _range(axis, lo, hi) -> Tuple[int, int]:
    """Index range [i0, i1) of an ascending uniform axis covering [lo, hi]."""
    n = len(axis)
    if n == 1:
        return (0, 1) if lo <= axis[0] <= hi else (0, 0)
    step = float(axis[1] - axis[0])
    i0 = int(np.floor((lo - axis[0]) / step))
    i1 = int(np.ceil((hi - axis[0]) / step)) + 1
    return max(i0, 0), min(i1, n)


@dataclass
class TubeSet:
    """A set of tapered capsules (segment p0 -> p1, radius r0 -> r1), one material.

    Branching trees, ribs and great vessels are all tube sets: the union of
    capsules is smooth at joints because each capsule has round ends.
    """

    p0: np.ndarray  # (N, 3) mm
    p1: np.ndarray  # (N, 3) mm
    r0: np.ndarray  # (N,) mm
    r1: np.ndarray  # (N,) mm

    def __post_init__(self):
        self.p0 = np.asarray(self.p0, np.float64).reshape(-1, 3)
        self.p1 = np.asarray(self.p1, np.float64).reshape(-1, 3)
        self.r0 = np.asarray(self.r0, np.float64).reshape(-1)
        self.r1 = np.asarray(self.r1, np.float64).reshape(-1)
        rmax = np.maximum(self.r0, self.r1)
        self.lo = np.minimum(self.p0, self.p1) - rmax[:, None]
        self.hi = np.maximum(self.p0, self.p1) + rmax[:, None]

    def __len__(self) -> int:
        return len(self.r0)

    @classmethod
    def empty(cls) -> "TubeSet":
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    @classmethod
    def concat(cls, sets) -> "TubeSet":
        sets = [s for s in sets if len(s)]
        if not sets:
            return cls.empty()
        return cls(
            np.concatenate([s.p0 for s in sets]),
            np.concatenate([s.p1 for s in sets]),
            np.concatenate([s.r0 for s in sets]),
            np.concatenate([s.r1 for s in sets]),
        )

    @classmethod
    def from_path(cls, points, radii) -> "TubeSet":
        """Consecutive capsules along a polyline with a radius per vertex."""
        pts = np.asarray(points, np.float64)
        rad = np.asarray(radii, np.float64)
        return cls(pts[:-1], pts[1:], rad[:-1], rad[1:])

    def subset(self, mask) -> "TubeSet":
        return TubeSet(self.p0[mask], self.p1[mask], self.r0[mask], self.r1[mask])

    def scaled(self, factor: float = 1.0, offset: float = 0.0) -> "TubeSet":
        """Same axes with radii ``r * factor + offset`` (offset < 0 may vanish a tube)."""
        r0 = np.maximum(self.r0 * factor + offset, 0.0)
        r1 = np.maximum(self.r1 * factor + offset, 0.0)
        keep = np.maximum(r0, r1) > 0.05
        return TubeSet(self.p0[keep], self.p1[keep], r0[keep], r1[keep])

    def render(self, out: np.ndarray, xs, ys, zs, soft: float, value: float = 1.0) -> None:
        """Max-composite ``value * occupancy`` into ``out`` (nz, ny, nx), float32 or uint8.

        ``xs``, ``ys``, ``zs`` are ascending uniform axes (mm) of ``out``. For
        uint8 output, ``value`` scales occupancy 1 to 255.
        """
        if not len(self) or out.size == 0:
            return
        lo_b = np.array([xs[0], ys[0], zs[0]]) - soft
        hi_b = np.array([xs[-1], ys[-1], zs[-1]]) + soft
        hit = np.all((self.hi >= lo_b) & (self.lo <= hi_b), axis=1)
        is_int = out.dtype == np.uint8
        scale = np.float32(255.0 * value if is_int else value)
        xs = np.asarray(xs, np.float32)
        ys = np.asarray(ys, np.float32)
        zs = np.asarray(zs, np.float32)
        idx = np.flatnonzero(hit)
        single = self._render_small(out, idx, xs, ys, zs, soft, scale, is_int)
        for k in single:
            c0, c1 = _range(xs, self.lo[k, 0] - soft, self.hi[k, 0] + soft)
            r0, r1 = _range(ys, self.lo[k, 1] - soft, self.hi[k, 1] + soft)
            z0, z1 = _range(zs, self.lo[k, 2] - soft, self.hi[k, 2] + soft)
            if c0 >= c1 or r0 >= r1 or z0 >= z1:
                continue
            occ = capsule_occupancy(
                xs[c0:c1], ys[r0:r1], zs[z0:z1], self.p0[k], self.p1[k], self.r0[k], self.r1[k], soft
            )
            occ *= scale
            view = out[z0:z1, r0:r1, c0:c1]
            if is_int:
                np.maximum(view, (occ + np.float32(0.5)).astype(np.uint8), out=view)
            else:
                np.maximum(view, occ, out=view)


    def _render_small(self, out, idx, xs, ys, zs, soft, scale, is_int) -> np.ndarray:
        """Draw the capsules that fit a small fixed box all at once; return the others' indices."""
        axes = (xs, ys, zs)
        if min(len(a) for a in axes) < BATCH_BOX or min(len(a) for a in axes) < 2 or len(idx) < 8:
            return idx
        first = np.empty((len(idx), 3), int)
        fits = np.ones(len(idx), bool)
        for d, axis in enumerate(axes):
            step = float(axis[1] - axis[0])
            i0 = np.maximum(np.floor((self.lo[idx, d] - soft - axis[0]) / step).astype(int), 0)
            i1 = np.minimum(np.ceil((self.hi[idx, d] + soft - axis[0]) / step).astype(int) + 1, len(axis))
            fits &= i1 - i0 <= BATCH_BOX
            first[:, d] = np.minimum(i0, len(axis) - BATCH_BOX)
        small = np.flatnonzero(fits)
        grid = np.arange(BATCH_BOX)
        for start in range(0, len(small), BATCH_SIZE):
            sel = small[start:start + BATCH_SIZE]
            k = idx[sel]
            f = first[sel]
            bx = xs[f[:, 0, None] + grid][:, None, None, :]
            by = ys[f[:, 1, None] + grid][:, None, :, None]
            bz = zs[f[:, 2, None] + grid][:, :, None, None]
            occ = _capsules_occupancy(bx, by, bz, self.p0[k], self.p1[k], self.r0[k], self.r1[k], soft)
            occ *= scale
            if is_int:
                occ = (occ + np.float32(0.5)).astype(np.uint8)
            for j in range(len(k)):
                c0, r0, z0 = f[j]
                view = out[z0:z0 + BATCH_BOX, r0:r0 + BATCH_BOX, c0:c0 + BATCH_BOX]
                np.maximum(view, occ[j], out=view)
        return idx[~fits]


BATCH_BOX = 16  # capsules within 16^3 samples are drawn together
BATCH_SIZE = 128


def _capsules_occupancy(bx, by, bz, a, b, ra, rb, soft) -> np.ndarray:
    """Occupancy (K, nz, ny, nx) of K capsules on their own boxes (axes broadcast per capsule)."""
    v = (b - a).astype(np.float32)
    l2 = np.maximum((v * v).sum(1), np.float32(1e-9))
    a = a.astype(np.float32)

    def col(arr, i):
        return arr[:, i, None, None, None]

    dx, dy, dz = bx - col(a, 0), by - col(a, 1), bz - col(a, 2)
    w = v / l2[:, None]
    t = dz * col(w, 2) + dy * col(w, 1) + dx * col(w, 0)
    np.clip(t, 0.0, 1.0, out=t)
    ex = dx - t * col(v, 0)
    d2 = ex * ex
    ey = dy - t * col(v, 1)
    ey *= ey
    d2 += ey
    ez = dz - t * col(v, 2)
    ez *= ez
    d2 += ez
    np.sqrt(d2, out=d2)
    ra = ra.astype(np.float32)[:, None, None, None]
    rb = rb.astype(np.float32)[:, None, None, None]
    r = t * (rb - ra)
    r += ra
    r -= d2
    return soft_step(r, soft)


def capsule_occupancy(xs, ys, zs, a, b, ra, rb, soft) -> np.ndarray:
    """Occupancy (nz, ny, nx) of a tapered capsule from ``a`` (radius ra) to ``b`` (rb)."""
    v = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    l2 = float(v @ v)
    dx = (xs - np.float32(a[0]))[None, None, :]
    dy = (ys - np.float32(a[1]))[None, :, None]
    dz = (zs - np.float32(a[2]))[:, None, None]
    if l2 < 1e-9:
        d = np.sqrt(dx * dx + dy * dy + dz * dz)
        return soft_step(np.float32(max(ra, rb)) - d, soft)
    vx, vy, vz = (np.float32(c / l2) for c in v)
    t = dz * vz + dy * vy + dx * vx  # broadcast to (nz, ny, nx)
    np.clip(t, 0.0, 1.0, out=t)
    fx, fy, fz = (np.float32(c) for c in v)
    ex = dx - t * fx
    d2 = ex * ex
    ey = dy - t * fy
    ey *= ey
    d2 += ey
    ez = dz - t * fz
    ez *= ez
    d2 += ez
    np.sqrt(d2, out=d2)
    r = t * np.float32(rb - ra)
    r += np.float32(ra)
    r -= d2
    return soft_step(r, soft)
