"""Lung nodules: kinds, shapes, placement and rendering.

Kinds: solid (about 0..+60 HU), part-solid (a solid core in a ground-glass
halo) and ground-glass (about -650..-300 HU). Shapes range from round to
lobulated (a radius modulated over the sphere) and spiculated (thin tapering
spikes). Locations: free in the parenchyma, juxta-pleural (touching the chest
wall) and juxta-vascular (a vessel runs into it).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from edge.phantom.lungmap import LungMap
from edge.phantom.shapes import TubeSet, soft_step

NODULE_KINDS = ("solid", "part_solid", "ground_glass")
NODULE_LOCATIONS = ("parenchymal", "juxta_pleural", "juxta_vascular")
MIN_DIAMETER_MM = 4.0
MAX_DIAMETER_MM = 30.0


@dataclass(frozen=True)
class Nodule:
    """Ground truth of one nodule: centre (patient mm, LPS), nominal diameter, kind, location."""

    center: Tuple[float, float, float]
    diameter_mm: float
    kind: str
    location: str
    hu: float  # attenuation of the solid part, or of the ground glass for ground-glass nodules


@dataclass
class NoduleShape:
    """How one nodule is drawn."""

    nodule: Nodule
    radius: float
    lobe_dirs: np.ndarray  # (m, 3) unit vectors
    lobe_amp: np.ndarray  # (m,)
    lobe_freq: np.ndarray  # (m,)
    lobe_phase: np.ndarray  # (m,)
    edge_mm: float
    solid_hu: float
    glass_hu: float
    core_offset: np.ndarray  # part-solid core centre relative to the nodule centre
    core_radius: float  # 0 unless part-solid
    texture_dirs: np.ndarray  # (k, 3) wave vectors (rad/mm)
    texture_phase: np.ndarray
    texture_amp: float
    spicules: TubeSet = field(default_factory=TubeSet.empty)

    @property
    def center(self) -> np.ndarray:
        return np.asarray(self.nodule.center, np.float64)

    @property
    def extent(self) -> float:
        """Half-size of a box that holds the nodule and its spicules."""
        r = self.radius * (1.0 + float(np.abs(self.lobe_amp).sum())) + 2 * self.edge_mm
        if len(self.spicules):
            tips = np.concatenate([self.spicules.p1, self.spicules.p0]) - self.center
            r = max(r, float(np.linalg.norm(tips, axis=1).max()) + 1.5)
        return r


def sample_diameter(rng: np.random.Generator, kind: str) -> float:
    """Nominal diameter (mm): mostly small, up to 30; sub-solid ones tend to be larger."""
    if kind == "solid":
        d = MIN_DIAMETER_MM + (MAX_DIAMETER_MM - MIN_DIAMETER_MM) * rng.beta(1.2, 3.5)
    else:
        d = 6.0 + (MAX_DIAMETER_MM - 6.0) * rng.beta(1.5, 2.5)
    return float(np.clip(d, MIN_DIAMETER_MM, MAX_DIAMETER_MM))


def sample_count(rng: np.random.Generator) -> int:
    """0 to 6 nodules; about one series in five has none."""
    return int(rng.choice(7, p=[0.2, 0.26, 0.2, 0.14, 0.1, 0.06, 0.04]))


def make_shape(rng: np.random.Generator, center, diameter: float, kind: str, location: str,
               contrast: bool, pixel_mm: float) -> NoduleShape:
    """Draw the look of one nodule of the given kind and size."""
    radius = diameter / 2.0
    style = rng.choice(["round", "lobulated", "spiculated"], p=[0.45, 0.35, 0.2])
    m = 6
    dirs = rng.normal(size=(m, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amp_total = {"round": rng.uniform(0.02, 0.07), "lobulated": rng.uniform(0.12, 0.25),
                 "spiculated": rng.uniform(0.06, 0.16)}[style]
    amp = rng.dirichlet(np.ones(m)) * amp_total
    solid_hu = rng.uniform(0, 60) + (rng.uniform(10, 35) if contrast else 0.0)
    glass_hu = rng.uniform(-650, -300)
    if kind == "ground_glass":
        edge = rng.uniform(1.0, 2.5)
        tex_amp = rng.uniform(25, 55)
    elif kind == "part_solid":
        edge = rng.uniform(0.8, 2.0)
        tex_amp = rng.uniform(20, 40)
    else:
        edge = max(pixel_mm, rng.uniform(0.4, 1.0))
        tex_amp = rng.uniform(3, 12)
    core_r = radius * rng.uniform(0.3, 0.65) if kind == "part_solid" else 0.0
    core_off = rng.normal(size=3) * radius * 0.15 if kind == "part_solid" else np.zeros(3)
    shape = NoduleShape(
        nodule=Nodule(tuple(float(v) for v in center), float(diameter), kind, location,
                      float(glass_hu if kind == "ground_glass" else solid_hu)),
        radius=radius,
        lobe_dirs=dirs,
        lobe_amp=amp,
        lobe_freq=rng.uniform(2.0, 4.5, m),
        lobe_phase=rng.uniform(0, 2 * np.pi, m),
        edge_mm=edge,
        solid_hu=solid_hu,
        glass_hu=glass_hu,
        core_offset=core_off,
        core_radius=core_r,
        texture_dirs=rng.normal(size=(5, 3)) * rng.uniform(0.6, 1.6),
        texture_phase=rng.uniform(0, 2 * np.pi, 5),
        texture_amp=tex_amp,
    )
    if style == "spiculated" and kind != "ground_glass":
        shape.spicules = _spicules(rng, shape)
    return shape


def _spicules(rng, shape: NoduleShape) -> TubeSet:
    n = int(rng.integers(6, 18))
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    base_r = shape.core_radius if shape.core_radius else shape.radius
    start = shape.center + shape.core_offset + d * base_r * 0.7
    length = base_r * 0.3 + rng.uniform(2.0, 9.0, n) * min(1.0, shape.radius / 5.0 + 0.4)
    end = start + d * (length + base_r * 0.3)[:, None]
    r0 = rng.uniform(0.45, 0.9, n) * min(1.0, 0.4 + shape.radius / 8.0)
    return TubeSet(start, end, r0, r0 * 0.3)


def render_nodule(shape: NoduleShape, frac: np.ndarray, value: np.ndarray, xs, ys, zs, soft: float) -> None:
    """Composite one nodule into ``frac`` (occupancy) and ``value`` (occupancy x HU), (nz, ny, nx)."""
    c = shape.center
    e = shape.extent
    ix = _span(xs, c[0] - e, c[0] + e)
    iy = _span(ys, c[1] - e, c[1] + e)
    iz = _span(zs, c[2] - e, c[2] + e)
    if ix is None or iy is None or iz is None:
        return
    px = (xs[ix[0]:ix[1]] - c[0]).astype(np.float32)[None, None, :]
    py = (ys[iy[0]:iy[1]] - c[1]).astype(np.float32)[None, :, None]
    pz = (zs[iz[0]:iz[1]] - c[2]).astype(np.float32)[:, None, None]
    rho = np.sqrt(px * px + py * py + pz * pz) + np.float32(1e-6)
    gain = np.ones(rho.shape, np.float32)
    for w, a, k, ph in zip(shape.lobe_dirs, shape.lobe_amp, shape.lobe_freq, shape.lobe_phase):
        cos = (px * np.float32(w[0]) + py * np.float32(w[1]) + pz * np.float32(w[2])) / rho
        gain += np.float32(a) * np.sin(np.float32(k) * cos + np.float32(ph))
    occ = soft_step(np.float32(shape.radius) * gain - rho, max(shape.edge_mm, soft))
    tex = np.zeros(rho.shape, np.float32)
    for w, ph in zip(shape.texture_dirs, shape.texture_phase):
        tex += np.sin(px * np.float32(w[0]) + py * np.float32(w[1]) + pz * np.float32(w[2]) + np.float32(ph))
    tex *= np.float32(shape.texture_amp / np.sqrt(len(shape.texture_phase) / 2.0))
    kind = shape.nodule.kind
    if kind == "solid":
        hu = np.float32(shape.solid_hu) + tex
    elif kind == "ground_glass":
        hu = np.float32(shape.glass_hu) + tex
    else:
        o = shape.core_offset
        qx, qy, qz = px - np.float32(o[0]), py - np.float32(o[1]), pz - np.float32(o[2])
        core = soft_step(np.float32(shape.core_radius) * gain - np.sqrt(qx * qx + qy * qy + qz * qz), max(0.7, soft))
        hu = np.float32(shape.glass_hu) + core * np.float32(shape.solid_hu - shape.glass_hu) + tex
    if len(shape.spicules):
        sp = np.zeros(rho.shape, np.float32)
        shape.spicules.render(sp, xs[ix[0]:ix[1]], ys[iy[0]:iy[1]], zs[iz[0]:iz[1]], soft)
        hu = hu + sp * (np.float32(shape.solid_hu) - hu) * (sp > occ)
        occ = np.maximum(occ, sp)
    f = frac[iz[0]:iz[1], iy[0]:iy[1], ix[0]:ix[1]]
    v = value[iz[0]:iz[1], iy[0]:iy[1], ix[0]:ix[1]]
    take = occ > f
    f[take] = occ[take]
    v[take] = (occ * hu)[take]


def _span(axis, lo, hi) -> Optional[Tuple[int, int]]:
    i0 = int(np.searchsorted(axis, lo))
    i1 = int(np.searchsorted(axis, hi, side="right"))
    return (i0, i1) if i1 > i0 else None


def _distance_to_tubes(tubes: TubeSet, p: np.ndarray) -> np.ndarray:
    """Distance from point p to each tube's surface (negative inside)."""
    if not len(tubes):
        return np.zeros(0)
    v = tubes.p1 - tubes.p0
    l2 = np.maximum((v * v).sum(1), 1e-9)
    t = np.clip(((p - tubes.p0) * v).sum(1) / l2, 0, 1)
    d = np.linalg.norm(tubes.p0 + t[:, None] * v - p, axis=1)
    return d - (tubes.r0 + t * (tubes.r1 - tubes.r0))


def place_nodules(rng: np.random.Generator, lung: LungMap, vessels: TubeSet, count: int,
                  z_range: Tuple[float, float], contrast: bool, pixel_mm: float,
                  kinds: Optional[Sequence[str]] = None) -> List[NoduleShape]:
    """Up to ``count`` non-overlapping nodules with centres inside ``z_range``.

    Fewer are returned when the lungs in range are too small to hold them.
    """
    shapes: List[NoduleShape] = []
    for i in range(count):
        kind = kinds[i % len(kinds)] if kinds else str(rng.choice(NODULE_KINDS, p=[0.6, 0.15, 0.25]))
        location = str(rng.choice(NODULE_LOCATIONS, p=[0.5, 0.3, 0.2]))
        for attempt in range(6):
            diameter = sample_diameter(rng, kind) * (0.75 ** attempt)
            diameter = max(diameter, MIN_DIAMETER_MM)
            centre = _find_centre(rng, lung, vessels, location, diameter / 2.0, z_range, shapes)
            if centre is not None:
                shapes.append(make_shape(rng, centre, diameter, kind, location, contrast, pixel_mm))
                break
    return shapes


def _find_centre(rng, lung: LungMap, vessels: TubeSet, location: str, radius: float, z_range, placed,
                 tries: int = 40) -> Optional[np.ndarray]:
    margin = min(radius, 3.0)
    zr = (z_range[0] + margin, z_range[1] - margin)
    if zr[1] <= zr[0]:
        return None
    big = vessels.subset(np.maximum(vessels.r0, vessels.r1) > 1.2) if len(vessels) else vessels
    if location == "juxta_vascular":
        mid = 0.5 * (vessels.p0 + vessels.p1)
        r = 0.5 * (vessels.r0 + vessels.r1)
        ok = (r > 0.7) & (r < 4.0) & (mid[:, 2] > zr[0]) & (mid[:, 2] < zr[1])
        ok &= lung.depth_at(mid) > radius + 2.0
        cand = np.flatnonzero(ok)
        if len(cand) == 0:
            return None
        for k in rng.choice(cand, min(tries, len(cand)), replace=False):
            axis = vessels.p1[k] - vessels.p0[k]
            t = rng.uniform(0.2, 0.8)
            on = vessels.p0[k] + t * axis
            perp = np.cross(axis, rng.normal(size=3))
            perp /= np.linalg.norm(perp) + 1e-9
            c = on + perp * (r[k] * 0.5 + radius * rng.uniform(0.4, 0.9))
            if zr[0] < c[2] < zr[1] and lung.depth_at(c[None])[0] > radius * 0.7 and _apart(c, radius, placed):
                return c
        return None
    if location == "juxta_pleural":
        cand = lung.lung & (lung.wall_depth <= max(radius, lung.step)) & (lung.depth >= lung.wall_depth - lung.step)
    else:
        cand = lung.lung & (lung.depth >= radius + 3.0)
    zok = (lung.zs >= zr[0]) & (lung.zs <= zr[1])
    pts = lung.voxel_centres(cand & zok[:, None, None])
    if len(pts) == 0:
        return None
    for k in rng.choice(len(pts), min(tries, len(pts)), replace=False):
        c = pts[k] + rng.uniform(-0.5, 0.5, 3) * lung.step
        if location == "juxta_pleural":
            # push it out until its surface meets the chest wall
            depth = float(lung.wall_depth_at(c[None])[0])
            c = _towards_wall(lung, c, max(depth - radius * rng.uniform(0.6, 0.95), 0.0))
        elif len(big) and _distance_to_tubes(big, c).min() < radius + 1.0:
            continue
        if zr[0] < c[2] < zr[1] and _apart(c, radius, placed):
            return c
    return None


def _towards_wall(lung: LungMap, c: np.ndarray, distance: float) -> np.ndarray:
    """Move c in-plane by ``distance`` mm down the chest-wall distance gradient."""
    if distance <= 0:
        return c
    e = lung.step
    gx = lung.wall_depth_at([c + [e, 0, 0]])[0] - lung.wall_depth_at([c - [e, 0, 0]])[0]
    gy = lung.wall_depth_at([c + [0, e, 0]])[0] - lung.wall_depth_at([c - [0, e, 0]])[0]
    g = np.array([gx, gy, 0.0])
    n = np.linalg.norm(g)
    return c if n < 1e-6 else c - g / n * distance


def _apart(c, radius, placed) -> bool:
    return all(np.linalg.norm(c - s.center) > radius + s.radius + 5.0 for s in placed)
