"""Choose N calibration slices from a pool of CT series: stratified, diverse, reproducible, saved.

Strata (every slice of the pool belongs to exactly one):

- scanner profile: the ``profile`` column of the pool's ``series.csv`` (phantom
  sets) when present, else vendor / kernel / pixel spacing (0.1 mm) / slice
  thickness from the DICOM tags of the series;
- position along the chest: the slice's patient z as a fraction of its
  series' extent, apex (0) to base (1), in ``position_bins`` equal bins;
- with or without a nodule: the slice is within a radius of an annotated
  nodule centre (``annotations.csv``, LUNA16 columns; optional).

The N slices are shared equally between profiles, within a profile equally
between positions, and within a position ``nodule_fraction`` go to slices with a
nodule (water filling: a stratum with too few slices gives its share to the
others). Within a stratum the slices are picked greedily for HU diversity:
each pick is the candidate whose lung-window HU histogram is farthest (L1) from
every slice chosen so far, candidates being a seeded random subset
(``candidates_per_pick`` per slice to pick) so only those are decoded.

The manifest (JSON) lists each slice's SOP Instance UID, frame, file, stratum
and the reason it was chosen, plus its 2.5D neighbour files (``context`` on each
side, clamped at the series ends as the runtime does), so the data loader needs
nothing else. Same pool, settings and seed -> byte-identical manifest.
"""

import csv
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge.errors import ConfigError, DicomError, InputError

MANIFEST_FORMAT = "ct-edge-calibration-manifest"
MANIFEST_VERSION = 1
POSITION_NAMES = {3: ("apex", "middle", "base"), 5: ("apex", "upper", "middle", "lower", "base")}
LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
SKIPPED_SUFFIXES = {".csv", ".json", ".txt", ".md", ".npz", ".onnx"}


@dataclass(frozen=True)
class SelectionSettings:
    n: int = 300
    seed: int = 0
    position_bins: int = 5
    nodule_fraction: float = 0.25
    histogram_bins: int = 32
    candidates_per_pick: int = 4
    context: int = 3  # neighbours kept on each side: enough for up to 2 * context + 1 slices of 2.5D input

    def validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"calibration size must be a positive integer, got {self.n!r}")
        if not isinstance(self.position_bins, int) or self.position_bins < 1:
            raise ConfigError(f"position_bins must be a positive integer, got {self.position_bins!r}")
        if not 0.0 <= self.nodule_fraction <= 1.0:
            raise ConfigError(f"nodule_fraction must be in [0, 1], got {self.nodule_fraction!r}")
        if self.histogram_bins < 2 or self.candidates_per_pick < 1 or self.context < 0:
            raise ConfigError("histogram_bins >= 2, candidates_per_pick >= 1 and context >= 0 are required")


@dataclass(frozen=True)
class PoolSlice:
    path: str  # relative to the pool root, POSIX separators
    frame: int
    sop_uid: str
    location: float  # mm along the slice normal: the runtime's slice order
    z: float  # patient z (LPS, + towards the head)


@dataclass
class PoolSeries:
    series_uid: str
    profile: str
    slices: List[PoolSlice]  # in runtime order
    nodules: List[Tuple[float, float]] = field(default_factory=list)  # (coordZ, diameter_mm)


@dataclass
class CalibrationPool:
    root: Path
    series: List[PoolSeries]
    profile_source: str  # "series.csv" or "dicom tags"
    annotations: Optional[str]

    @property
    def n_slices(self) -> int:
        return sum(len(s.slices) for s in self.series)

    def fingerprint(self) -> str:
        """sha256 over every series' UID and its slices' files, frames and SOP UIDs."""
        h = hashlib.sha256()
        for s in sorted(self.series, key=lambda s: s.series_uid):
            h.update(s.series_uid.encode())
            for p in s.slices:
                h.update(f"\n{p.path}\t{p.frame}\t{p.sop_uid}".encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- pool


def _tables(root: Path, name: str) -> List[Path]:
    """``root/name`` and ``root/*/name`` (a pool may be several phantom sets side by side)."""
    return [p for p in [root / name] + sorted(root.glob(f"*/{name}")) if p.is_file()]


def _series_profiles(root: Path) -> Dict[str, str]:
    out = {}
    for path in _tables(root, "series.csv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "seriesuid" not in reader.fieldnames or "profile" not in reader.fieldnames:
                continue
            out.update({r["seriesuid"]: r["profile"] for r in reader if r.get("seriesuid") and r.get("profile")})
    return out


def _annotations(paths: Sequence[Path]) -> Dict[str, List[Tuple[float, float]]]:
    from toolchain.evaluation.io import read_annotations

    out: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    for path in paths:
        nodules = read_annotations(path)
        for uid, centre, diameter in zip(nodules.seriesuids, nodules.centers, nodules.diameters):
            out[uid].append((float(centre[2]), float(diameter) if diameter > 0 else 10.0))
    return out


def _tag_profile(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)

    def text(keyword):
        v = ds.get(keyword, "")
        return str(v[0] if isinstance(v, pydicom.multival.MultiValue) and len(v) else v).strip() or "?"

    try:
        spacing = f"{float(ds.PixelSpacing[0]):.1f}mm"
    except (AttributeError, IndexError, TypeError, ValueError):
        spacing = "?mm"
    try:
        thickness = f"{float(ds.SliceThickness):g}mm"
    except (AttributeError, TypeError, ValueError):
        thickness = "?mm"
    return f"{text('Manufacturer')}/{text('ConvolutionKernel')}/{spacing}/{thickness}"


def scan_pool(root, annotations=None) -> CalibrationPool:
    """Every axial CT slice under ``root``, grouped by series (headers only; no pixel data is decoded).

    ``annotations`` defaults to every ``annotations.csv`` in ``root`` and its
    direct subfolders (profiles likewise come from every ``series.csv`` there).
    Files that are not CT images are skipped.
    """
    from edge.dicom import read_frames
    from edge.folder import iter_files

    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "calibration pool is not a folder")
    profiles = _series_profiles(root)
    if annotations is not None:
        ann_paths = [Path(annotations)]
        if not ann_paths[0].is_file():
            raise InputError(ann_paths[0], "annotations file not found")
    else:
        ann_paths = _tables(root, "annotations.csv")
    nodules = _annotations(ann_paths)
    by_series: Dict[str, List[PoolSlice]] = defaultdict(list)
    first_file: Dict[str, Path] = {}
    for path in iter_files(root):
        if path.suffix.lower() in SKIPPED_SUFFIXES:
            continue
        try:
            frames = read_frames(path, stop_before_pixels=True)
        except DicomError:
            continue
        rel = path.relative_to(root).as_posix()
        for f in frames:
            if f.is_localizer:
                continue
            g = f.geometry
            by_series[f.series_uid].append(PoolSlice(rel, f.frame_index, f.sop_uid, round(g.slice_location, 4),
                                                     round(float(g.position[2]), 4)))
            first_file.setdefault(f.series_uid, path)
    if not by_series:
        raise InputError(root, "calibration pool holds no CT series")
    series = []
    for uid in sorted(by_series):
        slices = sorted(by_series[uid], key=lambda s: (s.location, s.path, s.frame))
        profile = profiles.get(uid) or _tag_profile(first_file[uid])
        series.append(PoolSeries(uid, profile, slices, sorted(nodules.get(uid, []))))
    source = "series.csv" if profiles and all(s.series_uid in profiles for s in series) else "dicom tags"
    return CalibrationPool(root, series, source, ", ".join(str(p) for p in ann_paths) or None)


# --------------------------------------------------------------------------- allocation


def allocate(total: int, caps: Sequence[int], weights: Optional[Sequence[float]] = None) -> List[int]:
    """Split ``total`` over strata in proportion to ``weights`` (default equal), never above ``caps``.

    Water filling: strata that cannot take their share are filled and the rest
    shared again; what weights cannot place (zero-weight strata) is then shared
    equally. Remainders go by largest fraction, ties to the lower index.
    """
    caps = [max(0, int(c)) for c in caps]
    w = [1.0] * len(caps) if weights is None else [max(0.0, float(x)) for x in weights]
    alloc = [0] * len(caps)
    remaining = min(int(total), sum(caps))
    active = [i for i, c in enumerate(caps) if c > 0 and w[i] > 0]
    while remaining > 0 and active:
        wsum = sum(w[i] for i in active)
        share = {i: remaining * w[i] / wsum for i in active}
        full = [i for i in active if caps[i] - alloc[i] <= share[i]]
        if full:
            for i in full:
                remaining -= caps[i] - alloc[i]
                alloc[i] = caps[i]
            active = [i for i in active if i not in full]
            continue
        floors = {i: int(math.floor(share[i])) for i in active}
        for i in active:
            alloc[i] += floors[i]
        left = remaining - sum(floors.values())
        for i in sorted(active, key=lambda i: (-(share[i] - floors[i]), i))[:left]:
            alloc[i] += 1
        remaining = 0
    if remaining > 0 and weights is not None:
        extra = allocate(remaining, [c - a for c, a in zip(caps, alloc)])
        alloc = [a + e for a, e in zip(alloc, extra)]
    return alloc


# --------------------------------------------------------------------------- selection


def lung_histogram(frame, bins: int) -> np.ndarray:
    """Normalized histogram of a frame's HU in the lung window (values outside go to the end bins)."""
    hu = frame.hu()
    step = max(1, min(hu.shape) // 128)
    hu = np.clip(hu[::step, ::step], LUNG_WINDOW_HU[0], LUNG_WINDOW_HU[1] - 1e-3)
    counts, _ = np.histogram(hu, bins=bins, range=LUNG_WINDOW_HU)
    return counts / max(1, counts.sum())


def _position(series: PoolSeries, n_bins: int) -> List[Tuple[int, float]]:
    zs = [s.z for s in series.slices]
    top, bottom = max(zs), min(zs)
    out = []
    for z in zs:
        fraction = (top - z) / (top - bottom) if top > bottom else 0.5
        out.append((min(int(fraction * n_bins), n_bins - 1), fraction))
    return out


def _has_nodule(z: float, nodules: Sequence[Tuple[float, float]]) -> bool:
    return any(abs(z - nz) <= d / 2.0 for nz, d in nodules)


def _position_names(n: int) -> Tuple[str, ...]:
    return POSITION_NAMES.get(n, tuple(f"q{i + 1}of{n}" for i in range(n)))


def select_slices(pool: CalibrationPool, settings: SelectionSettings = SelectionSettings()) -> dict:
    """The calibration manifest (a JSON-ready dict) for ``pool``; see the module docstring."""
    from edge.dicom import read_frames

    settings.validate()
    names = _position_names(settings.position_bins)
    strata: Dict[Tuple[str, int, bool], List[Tuple[int, int, float]]] = defaultdict(list)
    for si, s in enumerate(pool.series):
        for k, (b, fraction) in enumerate(_position(s, settings.position_bins)):
            strata[(s.profile, b, _has_nodule(s.slices[k].z, s.nodules))].append((si, k, fraction))

    profiles = sorted({p for p, _, _ in strata})
    quota: Dict[Tuple[str, int, bool], int] = {}
    per_profile = allocate(settings.n, [sum(len(v) for (p, _, _), v in strata.items() if p == prof)
                                        for prof in profiles])
    for prof, q_prof in zip(profiles, per_profile):
        caps = [len(strata.get((prof, b, True), [])) + len(strata.get((prof, b, False), []))
                for b in range(settings.position_bins)]
        for b, q_pos in enumerate(allocate(q_prof, caps)):
            split = allocate(q_pos, [len(strata.get((prof, b, True), [])), len(strata.get((prof, b, False), []))],
                             [settings.nodule_fraction, 1.0 - settings.nodule_fraction])
            quota[(prof, b, True)], quota[(prof, b, False)] = split

    rng = np.random.default_rng(settings.seed)
    chosen_hist: List[np.ndarray] = []
    picks = []

    def histogram(si: int, k: int) -> np.ndarray:
        p = pool.series[si].slices[k]
        frames = read_frames(pool.root / p.path)
        frame = next((f for f in frames if f.frame_index == p.frame), None)
        if frame is None or frame.sop_uid != p.sop_uid:
            raise InputError(pool.root / p.path, "changed while the calibration slices were being chosen")
        return lung_histogram(frame, settings.histogram_bins)

    summary = []
    for key in sorted(strata, key=lambda k: (k[0], k[1], not k[2])):
        members = strata[key]
        q = quota.get(key, 0)
        summary.append({"profile": key[0], "position": names[key[1]], "nodule": key[2],
                        "available": len(members), "quota": q})
        if q == 0:
            continue
        n_cand = min(len(members), q * settings.candidates_per_pick)
        order = sorted(rng.choice(len(members), size=n_cand, replace=False).tolist())
        candidates = [members[i] for i in order]
        hists = np.stack([histogram(si, k) for si, k, _ in candidates])
        if chosen_hist:
            nearest = np.min(np.abs(hists[:, None, :] - np.stack(chosen_hist)[None]).sum(-1), axis=1)
        else:
            nearest = np.full(len(candidates), np.inf)
        available = np.ones(len(candidates), bool)
        for _ in range(q):
            if not chosen_hist:
                j = int(rng.integers(len(candidates)))
                why = "first slice of the calibration set: seeded random pick"
            else:
                score = np.where(available, nearest, -np.inf)
                j = int(np.argmax(score))
                why = (f"farthest lung-window HU histogram from the {len(chosen_hist)} slice(s) chosen before "
                       f"(L1 {float(nearest[j]):.3f})")
            available[j] = False
            chosen_hist.append(hists[j])
            nearest = np.minimum(nearest, np.abs(hists - hists[j]).sum(-1))
            si, k, fraction = candidates[j]
            picks.append((key, si, k, fraction, why, q, len(members)))

    slices = []
    for key, si, k, fraction, why, q, available_n in picks:
        s = pool.series[si]
        p = s.slices[k]
        last = len(s.slices) - 1
        stack = [s.slices[min(max(k + d, 0), last)] for d in range(-settings.context, settings.context + 1)]
        position = names[key[1]]
        slices.append({
            "sop_uid": p.sop_uid, "frame": p.frame, "series_uid": s.series_uid, "path": p.path,
            "location": p.location, "profile": key[0], "position": position,
            "position_fraction": round(fraction, 4), "nodule": key[2],
            "reason": (f"stratum {key[0]} / {position} / {'nodule' if key[2] else 'no nodule'} "
                       f"(quota {q} of {available_n}): {why}"),
            "stack": [[n.path, n.frame] for n in stack],
        })
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "settings": asdict(settings),
        "position_names": list(names),
        "pool": {"root": str(pool.root), "series": len(pool.series), "slices": pool.n_slices,
                 "profiles_from": pool.profile_source, "annotations": pool.annotations,
                 "fingerprint": pool.fingerprint()},
        "requested": settings.n,
        "selected": len(slices),
        "strata": summary,
        "slices": slices,
    }


# --------------------------------------------------------------------------- manifest files


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def write_manifest(path, manifest: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest_text(manifest))
    return path


def read_manifest(path) -> dict:
    """A manifest written by :func:`write_manifest`; InputError naming the file if it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "calibration manifest not found (make one with tools/build_engine.py)") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a calibration manifest: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise InputError(path, f"not a calibration manifest (format is not {MANIFEST_FORMAT!r})")
    if doc.get("version") != MANIFEST_VERSION:
        raise InputError(path, f"calibration manifest version {doc.get('version')!r}; "
                               f"this code reads {MANIFEST_VERSION}")
    for i, entry in enumerate(doc.get("slices", [])):
        missing = [k for k in ("sop_uid", "frame", "path", "stack") if k not in entry]
        if missing:
            raise InputError(path, f"slices[{i}] lacks {', '.join(missing)}")
    return doc
