"""One phantom CT series, generated in memory: :func:`generate_series`."""

import dataclasses
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from pydicom.uid import generate_uid

from edge.errors import ConfigError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.phantom.anatomy import AIR_HU, AnatomyPlane, sample_anatomy
from edge.phantom.lungmap import LungMap
from edge.phantom.nodules import NODULE_KINDS, Nodule, place_nodules, sample_count
from edge.phantom.render import SceneRenderer, TubeLayer
from edge.phantom.scanner import (
    Acquisition,
    NoiseModel,
    ScannerProfile,
    apply_kernel,
    fov_mask,
    get_profile,
    to_stored,
)
from edge.phantom.skeleton import build_skeleton
from edge.phantom.texture import SmoothField
from edge.phantom.vessels import build_lung_trees, place_hila

UID_NAMESPACE = "ct-edge-phantom-v1"
MIN_SIZE = 64
MAX_SIZE = 1024


@dataclass
class Localizer:
    """A coronal projection image (scout) of the series, ImageType ...\\LOCALIZER."""

    pixels: np.ndarray  # stored values (rows = z, columns = x)
    geometry: SliceGeometry
    sop_uid: str


@dataclass
class PhantomSeries:
    """A generated series: stored pixels in instance order plus everything to write or use it.

    ``pixels[i]`` is instance ``i + 1`` with geometry ``geometries[i]``; for
    head-first profiles that is top to bottom (z descending). HU =
    ``pixels * rescale_slope + rescale_intercept`` outside the padding.
    """

    seed: int
    acquisition: Acquisition
    pixels: np.ndarray  # (n, rows, cols) int16 or uint16
    geometries: Tuple[SliceGeometry, ...]
    rescale_intercept: float
    padding: Optional[Tuple[int, int]]
    nodules: Tuple[Nodule, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: Tuple[str, ...]
    rescale_slope: float = 1.0
    localizer: Optional[Localizer] = None
    patient_id: str = ""
    series_number: int = 2

    @property
    def profile(self) -> ScannerProfile:
        return self.acquisition.profile

    @property
    def n_slices(self) -> int:
        return int(self.pixels.shape[0])

    def hu(self, fill_hu: float = -1024.0) -> np.ndarray:
        """HU volume (float32, instance order); padding becomes ``fill_hu``."""
        out = self.pixels.astype(np.float32) * np.float32(self.rescale_slope) + np.float32(self.rescale_intercept)
        if self.padding is not None:
            lo, hi = self.padding
            out[(self.pixels >= lo) & (self.pixels <= hi)] = fill_hu
        return out

    def frames(self) -> List[CTFrame]:
        """The axial slices as :class:`~edge.frame.CTFrame` objects (no localizer)."""
        return [
            CTFrame(
                pixels=self.pixels[i],
                rescale_slope=self.rescale_slope,
                rescale_intercept=self.rescale_intercept,
                geometry=self.geometries[i],
                padding=self.padding,
                study_uid=self.study_uid,
                series_uid=self.series_uid,
                sop_uid=self.sop_uids[i],
                instance_number=i + 1,
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            )
            for i in range(self.n_slices)
        ]


def _rngs(seed: int, n: int) -> List[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[UID_NAMESPACE] + [str(p) for p in parts])


def generate_series(
    seed: int,
    profile: Union[str, ScannerProfile] = "ge_standard",
    size: int = 512,
    n_slices: Optional[int] = None,
    n_nodules: Optional[int] = None,
    nodule_kinds: Optional[Sequence[str]] = None,
    contrast: Optional[bool] = None,
    localizer: bool = False,
) -> PhantomSeries:
    """Generate one phantom chest CT series (deterministic in all arguments).

    ``seed`` fixes the patient (anatomy, vessels, nodules); ``profile`` the
    scanner. ``n_slices`` None covers the whole chest at the drawn slice
    spacing; a number covers that many slices centred on the lungs.
    ``n_nodules`` None draws 0..6; ``nodule_kinds`` cycles through the given
    kinds instead of drawing them. ``contrast`` None follows the profile.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"size must be an integer in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    if n_slices is not None and (not isinstance(n_slices, int) or n_slices < 1):
        raise ConfigError(f"n_slices must be a positive integer, got {n_slices!r}")
    if n_nodules is not None and (not isinstance(n_nodules, int) or not 0 <= n_nodules <= 20):
        raise ConfigError(f"n_nodules must be an integer in 0..20, got {n_nodules!r}")
    for k in nodule_kinds or ():
        if k not in NODULE_KINDS:
            raise ConfigError(f"unknown nodule kind {k!r} (known: {', '.join(NODULE_KINDS)})")
    r_anat, r_tree, r_bone, r_nod, r_tex, r_noise, r_misc = _rngs(seed, 7)
    r_scan = np.random.default_rng([seed, zlib.crc32(profile.name.encode())])
    acq = profile.realise(r_scan, size)
    if contrast is not None:
        acq = dataclasses.replace(acq, contrast=bool(contrast))
    anat = sample_anatomy(r_anat, contrast=acq.contrast)
    ps = acq.pixel_spacing

    # z coverage, ascending
    spacing = acq.slice_spacing
    if n_slices is None:
        top = anat.z_apex + r_misc.uniform(10, 30)
        bottom = anat.z_recess - r_misc.uniform(5, 25)
        n = int(round((top - bottom) / spacing)) + 1
    else:
        n = n_slices
        mid = 0.5 * (anat.z_apex + anat.z_recess) + r_misc.uniform(-0.1, 0.1) * (anat.z_apex - anat.z_recess)
        bottom = mid - 0.5 * (n - 1) * spacing
    z = np.round(bottom + spacing * np.arange(n), 4)

    # image grid (image centre at the reconstruction centre)
    half = (size - 1) / 2.0 * ps
    x0 = acq.recon_offset[0] - half
    y0 = acq.recon_offset[1] - half
    xs = (x0 + ps * np.arange(size)).astype(np.float64)
    ys = (y0 + ps * np.arange(size)).astype(np.float64)

    lung = LungMap(anat, step=3.0)
    place_hila(anat, lung)
    stop_radius = max(0.55, 0.4 * ps)
    trees = build_lung_trees(anat, lung, r_tree, stop_radius=stop_radius,
                             points_per_lung=int(8 * (10.5 / stop_radius) ** 2.8))
    bones = build_skeleton(anat, r_bone)
    count = sample_count(r_nod) if n_nodules is None else n_nodules
    half_t = acq.slice_thickness / 2.0
    shapes = place_nodules(r_nod, lung, trees.vessels, count, (z[0] - half_t, z[-1] + half_t),
                           acq.contrast, ps, kinds=nodule_kinds)

    # body bounding box: the only region with anatomy
    t = anat.tissues
    bx0 = anat.cx - anat.body_a * 1.06 - 6
    bx1 = anat.cx + anat.body_a * 1.06 + 6
    by0 = anat.cy - anat.body_b_front - anat.breast_mm - 6
    by1 = anat.cy + anat.body_b_back + 6
    c0, c1 = [int(np.clip(np.round((v - x0) / ps), 0, size)) for v in (bx0, bx1 + ps)]
    r0, r1 = [int(np.clip(np.round((v - y0) / ps), 0, size)) for v in (by0, by1 + ps)]
    lo = (bx0 - 10, by0 - 10, z[0] - 20)
    hi = (bx1 + 10, by1 + 10, z[-1] + 20)
    textures = {
        "soft": SmoothField(r_tex, lo, hi, 7.0),
        "lung_coarse": SmoothField(r_tex, lo, hi, 9.0),
        "lung_fine": SmoothField(r_tex, lo, hi, 3.0),
        "lung_holes": SmoothField(r_tex, lo, hi, 4.0),
        "marrow": SmoothField(r_tex, lo, hi, 2.5),
        "gland": SmoothField(r_tex, lo, hi, 2.5),
    }
    background = AnatomyPlane(anat, xs, ys, ps).table_hu()
    plane = AnatomyPlane(anat, xs[c0:c1], ys[r0:r1], ps, textures)
    layers = [
        TubeLayer("arteries", trees.arteries, t.blood_pulmonary),
        TubeLayer("veins", trees.veins, t.blood_vein),
        TubeLayer("airway_wall", trees.airway_wall, t.airway_wall, yields_to_nodules=True),
        TubeLayer("airway_lumen", trees.airway_lumen, AIR_HU + 10.0, yields_to_nodules=True),
        TubeLayer("cartilage", bones.cartilage, t.cartilage),
        TubeLayer("cortex", bones.cortex, t.cortex),
        TubeLayer("marrow", bones.marrow, t.trabecular),
    ]
    scene = SceneRenderer(plane, background, (r0, r1, c0, c1), layers, shapes)

    noise = NoiseModel(acq, r_noise)
    inside = fov_mask(size, profile.fov_fraction)
    dtype = np.int16 if profile.signed else np.uint16
    stored = np.empty((n, size, size), dtype)
    projection = np.zeros((n, size), np.float32) if localizer else None
    order = np.arange(n)[::-1] if profile.head_first else np.arange(n)  # instance -> ascending index
    position_of = np.empty(n, int)
    position_of[order] = np.arange(n)
    for i, hu, body in scene.slices(z, acq.slice_thickness, spacing):
        if projection is not None:
            projection[i] = np.clip(hu + 1000.0, 0, None).sum(axis=0) * (ps / 1000.0)
        img = apply_kernel(hu, acq)
        img += noise.sample(body)
        stored[position_of[i]] = to_stored(img, profile, inside)

    geoms = tuple(
        SliceGeometry(rows=size, columns=size, pixel_spacing=(ps, ps), position=(float(x0), float(y0), float(z[k])),
                      slice_thickness=acq.slice_thickness)
        for k in order
    )
    key = (seed, profile.name, size, n_slices, n_nodules, tuple(nodule_kinds or ()), contrast)
    series_uid = _uid("series", *key)
    padding = None
    if profile.padding_value is not None:
        padding = (profile.padding_value, profile.padding_value)
    loc = None
    if projection is not None:
        loc = _localizer(projection, z, xs, ps, spacing, profile, _uid("localizer", *key))
    return PhantomSeries(
        seed=seed,
        acquisition=acq,
        pixels=stored,
        geometries=geoms,
        rescale_intercept=float(profile.rescale_intercept),
        padding=padding,
        nodules=tuple(s.nodule for s in shapes),
        study_uid=_uid("study", *key),
        series_uid=series_uid,
        frame_of_reference_uid=_uid("frame", *key),
        sop_uids=tuple(_uid("sop", *key, k) for k in range(n)),
        localizer=loc,
        patient_id=f"PHANTOM-{seed}",
    )


def _localizer(projection: np.ndarray, z: np.ndarray, xs: np.ndarray, ps: float, spacing: float,
               profile: ScannerProfile, sop_uid: str) -> Localizer:
    """A coronal scout from the noiseless slices: rows top (head) to bottom, columns along x."""
    img = projection[::-1]  # first row = most superior
    scaled = img / max(float(img.max()), 1e-6) * 2500.0 - 1000.0
    inside = np.ones(scaled.shape, bool)
    stored = to_stored(scaled, profile, inside)
    geom = SliceGeometry(
        rows=img.shape[0], columns=img.shape[1], pixel_spacing=(spacing, ps),
        position=(float(xs[0]), 0.0, float(z[-1])), row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 0.0, -1.0), slice_thickness=0.0,
    )
    return Localizer(stored, geom, sop_uid)
