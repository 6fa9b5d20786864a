"""Preprocessed training slices, made through the runtime's own decode and preprocessing.

A series folder (DICOM, as written by tools/make_dataset.py) is decoded with
:mod:`edge.dicom`, ordered with :func:`edge.detector.order_slices` and
preprocessed with :class:`edge.preprocess.cpu.CpuPreprocessor` -- the exact
code the device runs -- so the network never sees a different input
distribution in deployment. Planes are kept as float16.
"""

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edge.detector import order_slices
from edge.errors import InputError
from edge.folder import group_series, load_series
from edge.preprocess.cpu import CpuPreprocessor
from edge.preprocess.spec import PreprocessSpec


CACHE_WORKERS_HELP = "processes decoding the series before training"


@dataclass
class CachedSeries:
    series_uid: str
    planes: np.ndarray  # (n_slices, n_windows, H, W) float16
    locations: np.ndarray  # (n_slices,) slice position along the normal, mm
    spacing_mm: float  # median distance between slices
    # per slice: list of (row, col, diameter_px, dz_fraction) in model-input pixels
    nodules: List[List[tuple]]
    # per slice, parallel to ``nodules``: which annotation of the series each entry is (None: not known)
    nodule_ids: Optional[List[List[int]]] = None


def read_annotations(path) -> Dict[str, List[tuple]]:
    """LUNA16 annotations.csv -> {seriesuid: [(x, y, z, diameter_mm), ...]}."""
    out: Dict[str, List[tuple]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[row["seriesuid"]].append(
                (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]), float(row["diameter_mm"]))
            )
    return out


def cache_series(group, spec: PreprocessSpec, annotations: List[tuple]) -> Optional[CachedSeries]:
    """Decode and preprocess one series (``group``: :func:`edge.folder.group_series`'s); None when unusable."""
    pre = CpuPreprocessor(spec)
    frames, _bad = load_series(group)
    try:
        frames = order_slices(frames)
    except InputError:
        return None
    if len(frames) < spec.slices:
        return None
    planes = np.stack([pre.preprocess_frame(f) for f in frames]).astype(np.float16)
    locations = np.array([f.geometry.slice_location for f in frames])
    per_slice = [[] for _ in frames]
    ids = [[] for _ in frames]
    resamples = [spec.resample_geometry(f.geometry.rows, f.geometry.columns, f.geometry.pixel_spacing)
                 for f in frames]
    for nid, (x, y, z, d) in enumerate(annotations):
        for k, f in enumerate(frames):
            geo = f.geometry
            dz = float(np.dot(np.array([x, y, z]) - np.asarray(geo.position), geo.normal))
            frac = abs(dz) / (d / 2.0)
            if frac > 1.0:
                continue
            row, col = geo.patient_to_pixel([x, y, z])
            rs = resamples[k]
            r_in, c_in = rs.to_output(float(row), float(col))
            mm_per_px = 0.5 * (rs.scale_y * geo.pixel_spacing[0] + rs.scale_x * geo.pixel_spacing[1])
            per_slice[k].append((float(r_in), float(c_in), d / mm_per_px, frac))
            ids[k].append(nid)
    spacing = float(np.median(np.abs(np.diff(locations)))) if len(locations) > 1 else 1.0
    return CachedSeries(group.series_uid, planes, locations, spacing, per_slice, ids)


def _cache_series_args(args) -> Optional[CachedSeries]:
    return cache_series(*args)


def cache_split(split_dir, spec: PreprocessSpec, workers: int = 1) -> List[CachedSeries]:
    """Decode and preprocess every series of one split folder, in series order.

    ``workers`` > 1 decodes series in that many processes (the result is the same).
    """
    split_dir = Path(split_dir)
    annotations = read_annotations(split_dir / "annotations.csv")
    groups, _rejected = group_series(split_dir)
    jobs = [(g, spec, annotations.get(g.series_uid, [])) for g in groups]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        # spawn: the caller may hold torch's thread pools, which fork does not copy safely
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            cached = pool.map(_cache_series_args, jobs, chunksize=1)
    else:
        cached = [cache_series(*job) for job in jobs]
    return [c for c in cached if c is not None]
