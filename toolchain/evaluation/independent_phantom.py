"""A second, independent chest-CT phantom generator, for checking that the detector generalises.

Every model here is trained on :mod:`edge.phantom`. This module shares none of
its code or conventions, so a detector that learnt that generator's quirks
instead of nodules loses CPM here:

- anatomy: analytic shapes evaluated in patient coordinates (body, fat and
  muscle walls, lungs with diaphragm domes, mediastinum, heart, aorta,
  trachea, vertebra, ribs cut obliquely by the slice plane), with a
  gravity-dependent density gradient in the lungs;
- vessels: random 3-D branching trees of cylinders grown from each hilum;
- nodules: ellipsoids with lobules and spicules; solid, part-solid,
  ground-glass and calcified; parenchymal, juxtapleural and juxtavascular;
- imaging: partial volume across the slice thickness, kernel blur and edge
  enhancement, depth-dependent correlated noise, a reconstruction circle;
- DICOM: signed and unsigned storage, 12- and 16-bit, intercepts 0 / -1000
  / -1024 and a slope of 0.5, feet-first orientation (mirrored columns),
  instance numbers either way round, file names with and without ``.dcm``,
  implicit and explicit VR, RLE-compressed pixels, SliceLocation sometimes
  missing.

Ground truth is LUNA16-style (centre in patient mm, equivalent diameter) and
is computed from the same affine the files carry.
"""

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from edge.errors import ConfigError

NODULE_TYPES = ("solid", "part_solid", "ground_glass", "calcified")
NODULE_TYPE_WEIGHTS = (0.62, 0.1, 0.16, 0.12)
LOCATIONS = ("parenchymal", "juxta_pleural", "juxta_vascular")  # the names edge.phantom uses
LOCATION_WEIGHTS = (0.6, 0.25, 0.15)
AIR_HU = -1000.0


@dataclass(frozen=True)
class ReconProfile:
    """A reconstruction protocol: kernel, noise and the slice thicknesses it uses."""

    name: str
    manufacturer: str
    kernel: str
    blur_mm: Tuple[float, float]
    sharpen: Tuple[float, float]
    noise_hu: Tuple[float, float]
    grain_px: Tuple[float, float]
    thickness_mm: Tuple[float, ...]


RECON_PROFILES = (
    ReconProfile("orion_soft", "ORION MEDICAL", "SOFT2", (0.8, 1.1), (0.0, 0.0), (8.0, 18.0), (1.0, 1.6), (1.0, 1.25, 2.0, 2.5)),
    ReconProfile("orion_lung_sharp", "ORION MEDICAL", "LUNG7", (0.35, 0.5), (0.6, 1.2), (25.0, 45.0), (0.5, 0.8), (0.6, 0.8, 1.0)),
    ReconProfile("vega_lowdose", "VEGA", "LD-STD", (0.55, 0.8), (0.0, 0.3), (35.0, 60.0), (0.7, 1.1), (1.0, 1.5, 2.0)),
    ReconProfile("vega_thick", "VEGA", "STD", (0.6, 0.9), (0.0, 0.2), (10.0, 20.0), (0.8, 1.2), (2.5, 3.0)),
)

# (stored dtype, BitsStored, RescaleIntercept, RescaleSlope)
STORAGE_CONVENTIONS = (
    ("int16", 16, -1024.0, 1.0),
    ("uint16", 12, -1024.0, 1.0),
    ("int16", 16, 0.0, 1.0),
    ("uint16", 16, -1000.0, 1.0),
    ("int16", 16, -1024.0, 0.5),
)


def _rng_for(seed: int, *names) -> np.random.Generator:
    digest = hashlib.sha256(("independent-phantom/%d/" % seed + "/".join(map(str, names))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _uid(seed: int, *names) -> str:
    """A deterministic UID under the 2.25 (UUID-derived) root."""
    digest = hashlib.sha256(("uid/%d/" % seed + "/".join(map(str, names))).encode()).digest()
    return "2.25.%d" % (int.from_bytes(digest[:16], "big") >> 1)


@dataclass(frozen=True)
class Body:
    """Per-patient anatomy parameters (mm, LPS: +x patient left, +y posterior, +z superior)."""

    a: float  # body semi-axis, left-right
    b: float  # body semi-axis, antero-posterior
    fat: float
    muscle: float
    apex_z: float
    dome_right_z: float
    dome_left_z: float
    carina_z: float
    heart_top_z: float
    rib_pitch: float
    rib_phase: float
    contrast: bool

    @property
    def cavity(self) -> Tuple[float, float]:
        return self.a - self.fat - self.muscle, self.b - self.fat - self.muscle

    @staticmethod
    def draw(rng: np.random.Generator) -> "Body":
        dome_r = rng.uniform(-70.0, -35.0)
        return Body(a=rng.uniform(140.0, 180.0), b=rng.uniform(100.0, 125.0), fat=rng.uniform(6.0, 28.0),
                    muscle=rng.uniform(8.0, 15.0), apex_z=rng.uniform(95.0, 125.0), dome_right_z=dome_r,
                    dome_left_z=dome_r - rng.uniform(5.0, 20.0), carina_z=rng.uniform(-5.0, 15.0),
                    heart_top_z=rng.uniform(-5.0, 15.0), rib_pitch=rng.uniform(22.0, 28.0),
                    rib_phase=rng.uniform(0.0, 25.0), contrast=bool(rng.random() < 0.3))


def heart_inside(body: Body, x, y, z) -> np.ndarray:
    """Signed distance (mm, > 0 inside) to the heart, which bulges into the left lung below its top."""
    scale = np.sqrt(np.clip((body.heart_top_z - z) / 25.0, 0.0, 1.0))
    a, b = 58.0 * scale + 1e-3, 48.0 * scale + 1e-3
    return (1.0 - np.sqrt(((x - 25.0) / a) ** 2 + ((y + 25.0) / b) ** 2)) * np.minimum(a, b)


def lung_mask(body: Body, x, y, z) -> np.ndarray:
    """True where (x, y, z) (arrays, mm) is lung parenchyma."""
    x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
    ca, cb = body.cavity
    ca, cb = ca - 3.0, cb - 3.0  # pleura and parietal fat
    inside = (x / ca) ** 2 + (y / cb) ** 2 < 1.0
    taper = np.sqrt(np.clip((body.apex_z - z) / 45.0, 0.0, 1.0))
    cx = ca * 0.52
    lateral = ((np.abs(x) - cx) / (ca * 0.5 * np.maximum(taper, 1e-3))) ** 2 + (y / (cb * np.maximum(taper, 1e-3))) ** 2 < 1.0
    inside &= lateral & (taper > 0)
    # mediastinum: narrow above the heart, wide at its level
    med_half = np.where(z > body.heart_top_z, 22.0, 22.0 + 38.0 * np.clip((body.heart_top_z - z) / 30.0, 0.0, 1.0))
    inside &= np.abs(x - 6.0 * (z < body.heart_top_z)) > med_half * np.sqrt(np.clip(1.0 - ((y + 5.0) / (cb * 1.1)) ** 2, 0.0, 1.0))
    inside &= heart_inside(body, x, y, z) <= 0.0
    # paravertebral gutter: the spine
    inside &= (x / 30.0) ** 2 + ((y - cb + 8.0) / 32.0) ** 2 > 1.0
    # diaphragm domes, deeper at the periphery (costophrenic recesses)
    dome_top = np.where(x < 0, body.dome_right_z, body.dome_left_z)
    periphery = np.clip(((np.abs(x) - cx) / (ca * 0.5)) ** 2 + (y / cb) ** 2, 0.0, 1.5)
    inside &= z > dome_top - 55.0 * periphery - 10.0 * np.clip(y / cb, 0.0, 1.0)
    return inside


@dataclass
class Vessels:
    """Cylinders (p0, p1, radius) of the pulmonary vessel trees."""

    p0: np.ndarray
    p1: np.ndarray
    radius: np.ndarray

    @property
    def z_range(self) -> Tuple[np.ndarray, np.ndarray]:
        lo = np.minimum(self.p0[:, 2], self.p1[:, 2]) - self.radius
        hi = np.maximum(self.p0[:, 2], self.p1[:, 2]) + self.radius
        return lo, hi


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(d) * d
    return v / (np.linalg.norm(v) + 1e-12)


def grow_vessels(body: Body, rng: np.random.Generator, max_segments: int = 6000) -> Vessels:
    """Random branching trees from each hilum, kept inside the lungs, grown breadth first."""
    segments = []
    for side in (-1.0, 1.0):
        hilum = np.array([side * rng.uniform(30.0, 42.0), rng.uniform(-5.0, 10.0), body.carina_z - rng.uniform(5.0, 20.0)])
        stack = deque()
        for direction in ((side * 0.5, -0.2, 0.85), (side * 0.6, 0.4, 0.7), (side * 1.0, -0.3, 0.1), (side * 1.0, 0.4, 0.0),
                          (side * 0.5, -0.5, -0.7), (side * 0.5, 0.5, -0.7), (side * 0.7, 0.0, -0.7)):
            d = np.asarray(direction, float) + rng.normal(scale=0.15, size=3)
            stack.append((hilum.copy(), d / np.linalg.norm(d), rng.uniform(3.5, 5.5), 0))
        count = 0
        while stack and count < max_segments // 2:
            p, d, r, depth = stack.popleft()
            length = float(np.clip(r * rng.uniform(5.0, 8.0), 3.0, 28.0))
            for _try in range(4):  # a branch that would leave the lung bends away from the pleura
                q = p + d * length
                if depth < 2 or lung_mask(body, q[0], q[1], q[2]):
                    break
                d = d + 0.8 * _perpendicular(d, rng)
                d /= np.linalg.norm(d)
                length *= 0.8
            else:
                continue
            segments.append((p, q, r))
            count += 1
            if r < 0.5 or depth > 18:
                continue
            n_children = 2 if rng.random() < 0.9 else 1
            for _ in range(n_children):
                angle = math.radians(rng.uniform(15.0, 45.0))
                child = math.cos(angle) * d + math.sin(angle) * _perpendicular(d, rng)
                stack.append((q, child / np.linalg.norm(child), r * rng.uniform(0.7, 0.84), depth + 1))
    p0 = np.array([s[0] for s in segments])
    p1 = np.array([s[1] for s in segments])
    return Vessels(p0, p1, np.array([s[2] for s in segments]))


@dataclass(frozen=True)
class Ellipsoid:
    centre: np.ndarray
    rotation: np.ndarray  # columns: the axes
    semi_axes: np.ndarray
    hu: float


@dataclass
class Nodule:
    """One ground-truth nodule: its parts and its annotation."""

    centre: np.ndarray
    diameter_mm: float
    kind: str
    location: str
    hu: float
    parts: List[Ellipsoid] = field(default_factory=list)
    spicules: List[Tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)

    @property
    def extent(self) -> float:
        """Radius (mm) of a sphere around the centre that holds every part."""
        r = [np.linalg.norm(p.centre - self.centre) + p.semi_axes.max() for p in self.parts]
        r += [max(np.linalg.norm(a - self.centre), np.linalg.norm(b - self.centre)) + w for a, b, w in self.spicules]
        return float(max(r))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _sphere_directions() -> np.ndarray:
    d = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)], float)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


_DIRECTIONS = _sphere_directions()


def _nodule_hu(kind: str, rng: np.random.Generator) -> float:
    return {"solid": rng.uniform(15.0, 70.0), "part_solid": rng.uniform(-550.0, -350.0),
            "ground_glass": rng.uniform(-650.0, -350.0), "calcified": rng.uniform(250.0, 700.0)}[kind]


def make_nodule(centre, diameter: float, kind: str, location: str, rng: np.random.Generator) -> Nodule:
    """A lobulated ellipsoid nodule (with a solid core if part-solid, spicules sometimes)."""
    centre = np.asarray(centre, float)
    ratios = rng.uniform(0.8, 1.2, size=3)
    ratios /= np.cbrt(ratios.prod())
    hu = _nodule_hu(kind, rng)
    main = Ellipsoid(centre, _rotation(rng), ratios * diameter / 2.0, hu)
    nod = Nodule(centre, diameter, kind, location, hu, parts=[main])
    if kind != "calcified" and diameter >= 6.0:
        for _ in range(rng.integers(0, 4)):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            r = diameter / 2.0 * rng.uniform(0.3, 0.5)
            nod.parts.append(Ellipsoid(centre + d * diameter / 2.0 * 0.75, np.eye(3), np.full(3, r), hu))
    if kind == "part_solid":
        nod.parts.append(Ellipsoid(centre + rng.normal(scale=diameter * 0.05, size=3), _rotation(rng),
                                   ratios * diameter / 2.0 * rng.uniform(0.35, 0.55), rng.uniform(10.0, 50.0)))
    if kind == "solid" and diameter >= 8.0 and rng.random() < 0.3:
        for _ in range(rng.integers(4, 9)):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            start = centre + d * diameter / 2.0 * 0.8
            nod.spicules.append((start, start + d * diameter * rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.6)))
    return nod


def place_nodules(body: Body, vessels: Vessels, z_lo: float, z_hi: float, count: int,
                  rng: np.random.Generator) -> List[Nodule]:
    """Up to ``count`` nodules with centres between z_lo and z_hi, not touching each other."""
    ca, cb = body.cavity
    nodules: List[Nodule] = []
    for _ in range(count):
        diameter = float(np.exp(rng.uniform(np.log(3.5), np.log(28.0))))
        kind = str(rng.choice(NODULE_TYPES, p=NODULE_TYPE_WEIGHTS))
        location = str(rng.choice(LOCATIONS, p=LOCATION_WEIGHTS))
        r = diameter / 2.0
        for _attempt in range(600):
            if location == "juxta_vascular":
                pick = rng.integers(len(vessels.radius))
                vr = vessels.radius[pick]
                if not 0.8 <= vr <= 3.0:
                    continue
                axis = vessels.p1[pick] - vessels.p0[pick]
                axis /= np.linalg.norm(axis) + 1e-12
                mid = (vessels.p0[pick] + vessels.p1[pick]) / 2.0
                c = mid + _perpendicular(axis, rng) * (vr + r * 0.8)
            else:
                c = np.array([rng.uniform(-ca, ca), rng.uniform(-cb, cb), rng.uniform(z_lo, z_hi)])
            if not (z_lo <= c[2] <= z_hi) or not lung_mask(body, *c):
                continue
            if any(np.linalg.norm(c - n.centre) < (n.diameter_mm + diameter) / 2.0 + 10.0 for n in nodules):
                continue
            if location == "juxta_pleural":
                inner = lung_mask(body, *(c + _DIRECTIONS * r * 0.3).T)
                if inner.all() and not lung_mask(body, *(c + _DIRECTIONS * (r + 1.0)).T).all():
                    break
            elif lung_mask(body, *(c + _DIRECTIONS * (r + 2.0)).T).all():
                break
        else:
            continue
        nodules.append(make_nodule(c, diameter, kind, location, rng))
    return nodules


@dataclass(frozen=True)
class Acquisition:
    """One series' scanner settings and how its files are stored."""

    profile: ReconProfile
    pixel_spacing: float
    thickness: float
    spacing: float
    blur_mm: float
    sharpen: float
    noise_hu: float
    grain_px: float
    storage: Tuple[str, int, float, float]
    feet_first: bool
    reverse_instances: bool
    slice_location: bool
    transfer_syntax: str  # "explicit", "implicit", "rle"
    file_names: str  # "IM", "uid", "ct"
    fov_radius_mm: float
    padding: bool

    @staticmethod
    def draw(rng: np.random.Generator, body: Body, size: int) -> "Acquisition":
        prof = RECON_PROFILES[rng.integers(len(RECON_PROFILES))]
        min_ps = (2.0 * body.a + 30.0) / size
        ps = max(min_ps, rng.uniform(0.55, 0.95) * 512.0 / size)
        thickness = float(rng.choice(prof.thickness_mm))
        return Acquisition(
            profile=prof, pixel_spacing=round(ps, 5), thickness=thickness,
            spacing=round(thickness * float(rng.choice((0.5, 0.8, 1.0, 1.0))), 4),
            blur_mm=rng.uniform(*prof.blur_mm), sharpen=rng.uniform(*prof.sharpen), noise_hu=rng.uniform(*prof.noise_hu),
            grain_px=rng.uniform(*prof.grain_px), storage=STORAGE_CONVENTIONS[rng.integers(len(STORAGE_CONVENTIONS))],
            feet_first=bool(rng.random() < 0.25), reverse_instances=bool(rng.random() < 0.5),
            slice_location=bool(rng.random() < 0.7), transfer_syntax=str(rng.choice(("explicit", "implicit", "rle"), p=(0.55, 0.3, 0.15))),
            file_names=str(rng.choice(("IM", "uid", "ct"))), fov_radius_mm=ps * size / 2.0 * rng.uniform(0.95, 1.0),
            padding=bool(rng.random() < 0.5))


@dataclass
class IndependentSeries:
    """One generated series: anatomy, nodules, acquisition, slice positions (z, mm, ascending)."""

    seed: int
    index: int
    body: Body
    vessels: Vessels
    nodules: List[Nodule]
    acquisition: Acquisition
    size: int
    slice_z: np.ndarray
    centre_xy: Tuple[float, float]

    @property
    def series_uid(self) -> str:
        return _uid(self.seed, self.index, "series")

    def position(self, z: float) -> Tuple[float, float, float]:
        """ImagePositionPatient of the slice at z: the centre of pixel (0, 0)."""
        half = (self.size - 1) / 2.0 * self.acquisition.pixel_spacing
        x0 = self.centre_xy[0] + (half if self.acquisition.feet_first else -half)
        return (x0, self.centre_xy[1] - half, float(z))

    @property
    def row_direction(self) -> Tuple[float, float, float]:
        return (-1.0, 0.0, 0.0) if self.acquisition.feet_first else (1.0, 0.0, 0.0)

    @cached_property
    def pixel_grid(self) -> Tuple[np.ndarray, np.ndarray]:
        """Patient x and y (mm) of every pixel centre of an axial slice (computed once per series)."""
        ps = self.acquisition.pixel_spacing
        x0, y0, _ = self.position(0.0)
        cols = np.arange(self.size) * ps * self.row_direction[0] + x0
        rows = np.arange(self.size) * ps + y0
        return np.meshgrid(cols, rows)


def make_series(seed: int, index: int, size: int = 512, n_slices: int = 80) -> IndependentSeries:
    """Draw one series (deterministic in seed and index)."""
    if size < 64:
        raise ConfigError(f"size must be >= 64, got {size}")
    if n_slices < 3:
        raise ConfigError(f"slices must be >= 3, got {n_slices}")
    rng = _rng_for(seed, index)
    body = Body.draw(rng)
    acq = Acquisition.draw(rng, body, size)
    vessels = grow_vessels(body, rng)
    extent = (n_slices - 1) * acq.spacing
    lung_lo = body.dome_left_z - 40.0
    z_start = rng.uniform(lung_lo, max(lung_lo, body.apex_z - 25.0 - extent))
    slice_z = np.round(z_start + np.arange(n_slices) * acq.spacing, 4)
    count = int(rng.choice((0, 1, 1, 2, 2, 3)))
    margin = min(3.0, extent / 4.0)
    nodules = place_nodules(body, vessels, slice_z[0] + margin, slice_z[-1] - margin, count, rng)
    centre = (rng.uniform(-10.0, 10.0), rng.uniform(5.0, 25.0))
    return IndependentSeries(seed, index, body, vessels, nodules, acq, size, slice_z, centre)


def _distance_to_segment(qx, qy, qz, d: np.ndarray) -> np.ndarray:
    """Distance (mm) from points q, given relative to a segment's start, to the segment start..start + d."""
    t = np.clip((qx * d[0] + qy * d[1] + qz * d[2]) / (d @ d), 0.0, 1.0)
    return np.sqrt((qx - t * d[0]) ** 2 + (qy - t * d[1]) ** 2 + (qz - t * d[2]) ** 2)


def _soft(distance_inside: np.ndarray, ps: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (mm, > 0 inside)."""
    return np.clip(distance_inside / ps + 0.5, 0.0, 1.0)


def _ellipse_inside(x, y, cx, cy, a, b) -> np.ndarray:
    """Approximate signed distance (mm, > 0 inside) to an axis-aligned ellipse."""
    rho = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return (1.0 - rho) * min(a, b)


class _SlicePainter:
    """Paints the noiseless HU of one plane z onto the series' pixel grid."""

    def __init__(self, series: IndependentSeries):
        self.s = series
        self.x, self.y = series.pixel_grid
        self.ps = series.acquisition.pixel_spacing
        self.cavity = series.body.cavity
        rng = _rng_for(series.seed, series.index, "texture")
        self.waves = [(rng.normal(size=3) * rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi), rng.uniform(6.0, 14.0))
                      for _ in range(6)]

    def _to_pixel(self, x, y):
        ps = self.ps
        x0, y0, _ = self.s.position(0.0)
        col = (x - x0) / (ps * self.s.row_direction[0])
        row = (y - y0) / ps
        return row, col

    def _window(self, xs, ys):
        """Pixel box (r0, r1, c0, c1) covering patient x and y ranges, or None if off the image."""
        r_a, c_a = self._to_pixel(np.min(xs), np.min(ys))
        r_b, c_b = self._to_pixel(np.max(xs), np.max(ys))
        r0, r1 = int(np.floor(min(r_a, r_b))) - 1, int(np.ceil(max(r_a, r_b))) + 2
        c0, c1 = int(np.floor(min(c_a, c_b))) - 1, int(np.ceil(max(c_a, c_b))) + 2
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, self.s.size), min(c1, self.s.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return r0, r1, c0, c1

    def paint(self, z: float) -> np.ndarray:
        body, x, y, ps = self.s.body, self.x, self.y, self.ps
        ca, cb = self.cavity
        contrast = body.contrast
        hu = np.full(x.shape, AIR_HU)
        # table under the patient
        table_top = body.b + 1.0
        hu = np.where((y > table_top) & (y < table_top + 6.0) & (np.abs(x) < 230.0), 180.0, hu)
        skin = _ellipse_inside(x, y, 0.0, 0.0, body.a, body.b)
        hu = hu + _soft(skin, ps) * (-95.0 - hu)
        wall = _ellipse_inside(x, y, 0.0, 0.0, body.a - body.fat, body.b - body.fat)
        hu = hu + _soft(wall, ps) * (50.0 - hu)
        cavity = _ellipse_inside(x, y, 0.0, 0.0, ca, cb)
        hu = hu + _soft(cavity, ps) * (-60.0 - hu)  # mediastinal fat as the cavity's default
        # ribs: bands in oblique planes z = z_k + 0.5 y through the shell outside the cavity
        shell = (_ellipse_inside(x, y, 0.0, 0.0, ca + 10.0, cb + 10.0) > 0) & (cavity < -1.0)
        phase = np.mod(z - 0.5 * y - body.rib_phase, body.rib_pitch)
        rib = shell & (np.abs(phase - body.rib_pitch / 2.0) < 5.0) & (z - 0.5 * y < body.apex_z + 20.0)
        cartilage = rib & (y < -cb * 0.55) & (np.abs(x) < ca * 0.45)
        hu = np.where(rib & ~cartilage, 420.0, hu)
        hu = np.where(cartilage, 110.0, hu)
        # lungs
        lungs = lung_mask(body, x, y, np.full(x.shape, z))
        lungs_f = cv2.GaussianBlur(lungs.astype(np.float32), (0, 0), max(0.5, 0.6 / ps))
        texture = sum(8.0 * np.cos(k[0] * x + k[1] * y + k[2] * z + phi) * (a / 10.0) for k, phi, a in self.waves)
        parenchyma = -870.0 + 45.0 * np.clip((y + cb) / (2.0 * cb), 0.0, 1.0) + texture
        hu = hu + lungs_f * (parenchyma - hu)
        # mediastinal structures
        blood = 260.0 if contrast else 42.0
        if z < body.heart_top_z:
            hu = hu + _soft(heart_inside(body, x, y, z), ps) * ((blood * 0.6 + 15.0) - hu)
        if z < body.heart_top_z + 45.0:
            hu = hu + _soft(_ellipse_inside(x, y, 18.0, cb - 38.0, 12.0, 12.0), ps) * (blood - hu)  # descending aorta
        if body.heart_top_z - 10.0 < z < body.heart_top_z + 45.0:
            hu = hu + _soft(_ellipse_inside(x, y, -8.0, -30.0, 15.0, 15.0), ps) * (blood - hu)  # ascending aorta
        if body.heart_top_z + 45.0 <= z < body.heart_top_z + 60.0:
            hu = hu + _soft(_ellipse_inside(x, y, 5.0, -8.0, 32.0, 12.0), ps) * (blood - hu)  # arch
        if z > body.carina_z:
            hu = hu + _soft(_ellipse_inside(x, y, 0.0, -8.0, 10.0, 9.0), ps) * (40.0 - hu)
            hu = hu + _soft(_ellipse_inside(x, y, 0.0, -8.0, 8.0, 7.0), ps) * (AIR_HU - hu)
        hu = hu + _soft(_ellipse_inside(x, y, 12.0, cb - 55.0, 7.0, 6.0), ps) * (35.0 - hu)  # oesophagus
        # vertebra, canal, posterior elements
        vy = cb - 10.0
        hu = hu + _soft(_ellipse_inside(x, y, 0.0, vy, 17.0, 16.0), ps) * (650.0 - hu)
        hu = hu + _soft(_ellipse_inside(x, y, 0.0, vy, 15.0, 14.0), ps) * (210.0 - hu)
        hu = hu + _soft(_ellipse_inside(x, y, 0.0, vy + 24.0, 7.0, 7.0), ps) * (20.0 - hu)
        hu = hu + _soft(_ellipse_inside(x, y, 0.0, vy + 38.0, 4.0, 8.0), ps) * (500.0 - hu)
        # below the domes: liver on the right, spleen and stomach on the left
        dome = np.where(x < 0, body.dome_right_z, body.dome_left_z)
        abdomen = (cavity > 0) & (z < dome) & ~lungs & (hu < 100.0) & (hu > -200.0)
        hu = np.where(abdomen, np.where(x < 0, 58.0, 48.0), hu)
        self._vessels(hu, z, lungs_f)
        return hu

    def _vessels(self, hu: np.ndarray, z: float, lungs_f: np.ndarray) -> None:
        v = self.s.vessels
        lo, hi = v.z_range
        value = 190.0 if self.s.body.contrast else 40.0
        for i in np.nonzero((lo <= z) & (hi >= z))[0]:
            p0, p1, r = v.p0[i], v.p1[i], v.radius[i]
            d = p1 - p0
            # the part of the segment within r of the plane
            if abs(d[2]) > 1e-6:
                ta, tb = sorted(((z - r - p0[2]) / d[2], (z + r - p0[2]) / d[2]))
                ta, tb = max(ta, 0.0), min(tb, 1.0)
            else:
                ta, tb = 0.0, 1.0
            ends = np.array([p0 + ta * d, p0 + tb * d])
            box = self._window(np.r_[ends[:, 0] - r, ends[:, 0] + r], np.r_[ends[:, 1] - r, ends[:, 1] + r])
            if box is None:
                continue
            r0, r1, c0, c1 = box
            dist = _distance_to_segment(self.x[r0:r1, c0:c1] - p0[0], self.y[r0:r1, c0:c1] - p0[1], z - p0[2], d)
            alpha = _soft(r - dist, self.ps) * np.maximum(lungs_f[r0:r1, c0:c1], 0.0)
            sub = hu[r0:r1, c0:c1]
            hu[r0:r1, c0:c1] = np.where(value > sub, sub + alpha * (value - sub), sub)

    def paint_nodules(self, hu: np.ndarray, z: float) -> None:
        for nod in self.s.nodules:
            reach = nod.extent
            if abs(z - nod.centre[2]) > reach:
                continue
            c = nod.centre
            box = self._window(np.array([c[0] - reach, c[0] + reach]), np.array([c[1] - reach, c[1] + reach]))
            if box is None:
                continue
            r0, r1, c0, c1 = box
            px, py = self.x[r0:r1, c0:c1], self.y[r0:r1, c0:c1]
            sub = hu[r0:r1, c0:c1]
            for part in nod.parts:  # a part-solid nodule's core comes last, so it wins
                q = np.stack([px - part.centre[0], py - part.centre[1], np.full(px.shape, z - part.centre[2])], -1)
                u = (q @ part.rotation) / part.semi_axes
                inside = (1.0 - np.linalg.norm(u, axis=-1)) * part.semi_axes.min()
                alpha = _soft(inside, self.ps)
                sub = np.where(part.hu > sub, sub + alpha * (part.hu - sub), sub)
            for a, b, w in nod.spicules:
                alpha = _soft(w - _distance_to_segment(px - a[0], py - a[1], z - a[2], b - a), self.ps)
                sub = np.where(nod.hu > sub, sub + alpha * (nod.hu - sub), sub)
            hu[r0:r1, c0:c1] = sub


def render_slice(series: IndependentSeries, z: float, rng: Optional[np.random.Generator] = None,
                 painter: Optional[_SlicePainter] = None) -> np.ndarray:
    """HU of the slice centred at z: partial volume over the thickness, blur, noise (none if rng is None)."""
    painter = painter or _SlicePainter(series)
    acq = series.acquisition
    steps = max(1, int(math.ceil(acq.thickness / 0.7)))
    offsets = (np.arange(steps) + 0.5) / steps * acq.thickness - acq.thickness / 2.0
    hu = np.zeros((series.size, series.size))
    for dz in offsets:
        plane = painter.paint(z + dz)
        painter.paint_nodules(plane, z + dz)
        hu += plane
    hu /= steps
    img = hu.astype(np.float32)
    sigma = acq.blur_mm / acq.pixel_spacing
    if sigma > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if acq.sharpen > 0:
        img = img + acq.sharpen * (img - cv2.GaussianBlur(img, (0, 0), 1.5 * max(sigma, 0.5)))
    if rng is not None and acq.noise_hu > 0:
        noise = cv2.GaussianBlur(rng.normal(size=img.shape).astype(np.float32), (0, 0), acq.grain_px)
        noise *= acq.noise_hu / (noise.std() + 1e-6)
        depth = np.clip(_ellipse_inside(painter.x, painter.y, 0.0, 0.0, series.body.a, series.body.b) / series.body.b, 0.0, 1.0)
        img = img + noise * (0.35 + 0.65 * (img > -900) + 0.4 * depth).astype(np.float32)
    return img


def stored_pixels(hu: np.ndarray, series: IndependentSeries) -> Tuple[np.ndarray, Optional[int]]:
    """HU -> stored integers under the series' convention; the padding value if one is written."""
    dtype, bits, intercept, slope = series.acquisition.storage
    signed = dtype == "int16"
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    hu = np.maximum(hu, -1024.0)
    stored = np.clip(np.rint((hu - intercept) / slope), lo, hi)
    acq = series.acquisition
    x, y = series.pixel_grid
    outside = (x - series.centre_xy[0]) ** 2 + (y - series.centre_xy[1]) ** 2 > acq.fov_radius_mm ** 2
    padding = lo if acq.padding else None
    stored[outside] = lo
    if padding is not None:
        # tissue never takes the padding value
        stored[~outside & (stored == lo)] = lo + 1
    return stored.astype(np.int16 if signed else np.uint16), padding


def series_datasets(series: IndependentSeries, with_noise: bool = True):
    """(file name, pydicom Dataset) for every slice, in instance order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RLELossless

    acq = series.acquisition
    painter = _SlicePainter(series)
    noise_rng = _rng_for(series.seed, series.index, "noise") if with_noise else None
    dtype, bits, intercept, slope = acq.storage
    order = np.argsort(-series.slice_z) if not acq.reverse_instances else np.argsort(series.slice_z)
    study_uid = _uid(series.seed, series.index, "study")
    frame_uid = _uid(series.seed, series.index, "frame")
    out = []
    for instance, k in enumerate(order, start=1):
        z = float(series.slice_z[k])
        hu = render_slice(series, z, noise_rng, painter)
        pixels, padding = stored_pixels(hu, series)
        sop_uid = _uid(series.seed, series.index, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if acq.transfer_syntax == "implicit" else ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = acq.profile.manufacturer
        ds.ConvolutionKernel = acq.profile.kernel
        ds.PatientID = "IND%05d" % series.index
        ds.PatientName = "Independent^Phantom%d" % series.index
        ds.PatientPosition = "FFS" if acq.feet_first else "HFS"
        ds.SeriesNumber = 3
        ds.InstanceNumber = instance
        ds.KVP = "120"
        ds.SliceThickness = "%g" % acq.thickness
        ds.PixelSpacing = ["%.5f" % acq.pixel_spacing] * 2
        ds.ImageOrientationPatient = [*(f"{v:g}" for v in series.row_direction), "0", "1", "0"]
        ds.ImagePositionPatient = ["%.4f" % v for v in series.position(z)]
        if acq.slice_location:
            ds.SliceLocation = "%.4f" % z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = series.size
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if dtype == "int16" else 0
        ds.RescaleIntercept = "%g" % intercept
        ds.RescaleSlope = "%g" % slope
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1600"
        if padding is not None:
            ds.PixelPaddingValue = int(padding)
        if acq.transfer_syntax == "rle":
            ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
        else:
            ds.PixelData = pixels.tobytes()
        name = {"IM": "IM%05d" % instance, "uid": sop_uid + ".dcm", "ct": "CT.%04d.dcm" % instance}[acq.file_names]
        out.append((name, ds))
    return out


def write_series(series: IndependentSeries, folder, with_noise: bool = True) -> List[Path]:
    """Write the series' files into ``folder`` (created); their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ds in series_datasets(series, with_noise):
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


SERIES_COLUMNS = ("seriesuid", "folder", "profile", "n_slices", "n_nodules", "seed", "index", "slice_thickness",
                  "slice_spacing", "pixel_spacing", "contrast", "manufacturer", "storage", "orientation",
                  "transfer_syntax")


def series_row(series: IndependentSeries, folder: str) -> dict:
    acq = series.acquisition
    dtype, bits, intercept, slope = acq.storage
    return {"seriesuid": series.series_uid, "folder": folder, "profile": acq.profile.name,
            "n_slices": len(series.slice_z), "n_nodules": len(series.nodules), "seed": series.seed,
            "index": series.index, "slice_thickness": acq.thickness, "slice_spacing": acq.spacing,
            "pixel_spacing": acq.pixel_spacing, "contrast": int(series.body.contrast),
            "manufacturer": acq.profile.manufacturer, "storage": f"{dtype}/{bits}/{intercept:g}/{slope:g}",
            "orientation": "FFS" if acq.feet_first else "HFS", "transfer_syntax": acq.transfer_syntax}


def annotation_rows(series: IndependentSeries) -> Tuple[List[dict], List[dict]]:
    """LUNA16 annotations and per-nodule metadata rows of one series."""
    ann, meta = [], []
    for i, nod in enumerate(series.nodules):
        x, y, z = (float(v) for v in nod.centre)
        ann.append({"seriesuid": series.series_uid, "coordX": round(x, 3), "coordY": round(y, 3),
                    "coordZ": round(z, 3), "diameter_mm": round(nod.diameter_mm, 3)})
        meta.append({"seriesuid": series.series_uid, "index": i, "type": nod.kind, "location": nod.location,
                     "diameter_mm": round(nod.diameter_mm, 3), "hu": round(nod.hu, 1)})
    return ann, meta


def _write_one(job) -> Tuple[dict, List[dict], List[dict]]:
    seed, index, size, n_slices, out = job
    series = make_series(seed, index, size, n_slices)
    folder = "series_%04d" % index
    write_series(series, Path(out) / folder)
    ann, meta = annotation_rows(series)
    return series_row(series, folder), ann, meta


def _write_csv(path: Path, columns: Sequence[str], rows: List[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def make_independent_set(out, count: int, seed: int = 0, size: int = 512, n_slices: int = 80, workers: int = 1,
                         progress=None) -> Path:
    """Write ``count`` series to OUT/series_NNNN/ with annotations.csv, annotations_meta.csv, series.csv."""
    from concurrent.futures import ProcessPoolExecutor

    if count < 1:
        raise ConfigError(f"series must be >= 1, got {count}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    make_series(seed, 0, size, n_slices)  # bad settings fail here, before any file is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, size, n_slices, str(out)) for i in range(count)]
    results = []
    if workers == 1:
        for i, job in enumerate(jobs):
            results.append(_write_one(job))
            if progress:
                progress(i, results[-1][0])
    else:
        with ProcessPoolExecutor(workers) as pool:
            for i, res in enumerate(pool.map(_write_one, jobs)):
                results.append(res)
                if progress:
                    progress(i, res[0])
    _write_csv(out / "series.csv", SERIES_COLUMNS, [r[0] for r in results])
    _write_csv(out / "annotations.csv", ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"),
               [a for r in results for a in r[1]])
    _write_csv(out / "annotations_meta.csv", ("seriesuid", "index", "type", "location", "diameter_mm", "hu"),
               [m for r in results for m in r[2]])
    return out
