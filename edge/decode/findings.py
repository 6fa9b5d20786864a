"""Streaming 3-D aggregation: per-slice detections of one series -> nodule findings.

The caller feeds slices in order of slice location (increasing or decreasing; the
direction is taken from the first two slices) and calls :meth:`add_slice` for EVERY
slice, with an empty list when nothing was detected: gaps are counted in slices.
A finding is returned as soon as its nodule has ended, while the series is still
arriving; :meth:`flush` returns the rest at series end or timeout.

All slices of a series must be parallel. Distances are measured in the slice
plane, so tracks follow a nodule through gantry-tilted (oblique) series too.
"""

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np

from edge.decode.peaks import SliceDetection
from edge.decode.spec import DecodeSpec

_LOCATION_TOLERANCE_MM = 1e-3  # slices closer than this are the same slice


@dataclass(frozen=True)
class Finding:
    """One nodule, aggregated over the slices it was detected on (patient mm, DICOM LPS).

    The centre is the score-weighted mean of the track's detections: unlike the
    midpoint of the z extent, it uses every slice (averaging per-slice in-plane
    noise), resolves z below the slice spacing, and is not set by the two weakest
    detections at the ends of the track.
    """

    x: float
    y: float
    z: float
    diameter_mm: float  # largest in-plane diameter over the track
    probability: float  # max_score, scaled down for tracks elongated along z or too flat
    max_score: float
    n_slices: int  # slices with a detection
    z_extent_mm: float  # |last - first| slice location, centre to centre
    first_slice_location: float
    last_slice_location: float
    key_slice_location: float  # slice with the highest score
    slice_spacing_mm: float = 0.0  # between the series' slices where the track ended (0: not known)
    # Track shape, for the decode spec's rescorer (edge.decode.rescoring):
    mean_score: float = 0.0  # over the slices with a detection
    end_diameter_ratio: float = 1.0  # mean diameter of the first and last detection / diameter_mm
    end_score_ratio: float = 1.0  # mean score of the first and last detection / max_score
    drift_mm: float = 0.0  # in-plane distance from the first detection to the last

    def to_dict(self) -> dict:
        return asdict(self)


def shape_prior(max_score: float, z_extent_mm: float, slice_spacing_mm: float, diameter_mm: float,
                spec: DecodeSpec) -> float:
    """A finding's probability: its best slice score, scaled down when its 3-D shape is not nodule-like.

    Longer along z than ``spec.max_elongation`` x its diameter (a vessel), or a z span
    (extent plus one slice spacing) under ``spec.min_z_span`` x its diameter (too
    flat): see :class:`~edge.decode.spec.DecodeSpec`.
    """
    probability = max_score
    limit = spec.max_elongation
    if limit is not None and z_extent_mm > 0:
        elongation = z_extent_mm / diameter_mm if diameter_mm > 0 else math.inf
        if elongation > limit:
            probability = max_score * limit / elongation
    least = spec.min_z_span
    if least is not None and diameter_mm > 0 and slice_spacing_mm > 0:
        span = z_extent_mm + slice_spacing_mm
        if span < least * diameter_mm:
            probability *= (span / (least * diameter_mm)) ** 2
    return probability


class _Track:
    __slots__ = ("detections", "last_index")

    def __init__(self, detection: SliceDetection, index: int):
        self.detections = [detection]
        self.last_index = index

    @property
    def latest(self) -> SliceDetection:
        return self.detections[-1]


def _points(detections) -> np.ndarray:
    """(n, 5) array of x, y, z, slice_location, diameter_mm."""
    return np.array([[d.x, d.y, d.z, d.slice_location, d.diameter_mm] for d in detections], float).reshape(-1, 5)


def _in_plane_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) distances between :func:`_points` rows, less the component along
    the slice normal (which is the slice-location difference)."""
    d2 = ((a[:, None, :3] - b[None, :, :3]) ** 2).sum(-1)
    dn = a[:, None, 3] - b[None, :, 3]
    return np.sqrt(np.maximum(d2 - dn * dn, 0.0))


class SeriesFindingAggregator:
    """Links detections across the slices of one series into :class:`Finding` s, streaming."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self._tracks: List[_Track] = []
        self._index = -1  # index of the last slice added
        self._last_location: Optional[float] = None
        self._direction = 0  # +1 increasing, -1 decreasing, 0 not known yet
        self._spacing = 0.0  # distance between the last two slices
        self._flushed = False

    @property
    def open_tracks(self) -> int:
        """Tracks that may still grow (not yet returned as findings)."""
        return len(self._tracks)

    def add_slice(self, slice_location_mm: float, detections) -> List[Finding]:
        """Add one slice's detections; return the findings completed by it.

        ``slice_location_mm`` is ``SliceGeometry.slice_location`` (the position along the
        normal, not the DICOM SliceLocation tag) and must match the detections'.
        Raises ValueError when slices arrive out of order or twice (a caller bug),
        RuntimeError after :meth:`flush`.
        """
        if self._flushed:
            raise RuntimeError("add_slice after flush: the series is closed")
        loc = float(slice_location_mm)
        detections = list(detections)
        for d in detections:
            if abs(d.slice_location - loc) > _LOCATION_TOLERANCE_MM:
                raise ValueError(f"detection at slice location {d.slice_location} mm added to slice {loc} mm")
        self._check_order(loc)
        self._index += 1
        self._link(detections)
        return self._pop_complete(lambda t: self._index - t.last_index > self.spec.max_gap_slices)

    def flush(self) -> List[Finding]:
        """Close the series: return every remaining finding. Later calls return []."""
        self._flushed = True
        return self._pop_complete(lambda t: True)

    def _check_order(self, loc: float) -> None:
        if self._last_location is not None:
            delta = loc - self._last_location
            if abs(delta) < _LOCATION_TOLERANCE_MM:
                raise ValueError(f"slice location {loc} mm added twice")
            direction = 1 if delta > 0 else -1
            self._spacing = abs(delta)
            if self._direction == 0:
                self._direction = direction
            elif direction != self._direction:
                raise ValueError(
                    f"slice location {loc} mm out of order after {self._last_location} mm "
                    f"(slices must arrive sorted by location, {'in' if self._direction > 0 else 'de'}creasing)"
                )
        self._last_location = loc

    def _link(self, detections: List[SliceDetection]) -> None:
        """Greedy by score: each detection takes the nearest free track within its radius."""
        detections.sort(key=lambda d: -d.score)
        candidates = list(self._tracks)  # all open: tracks past the gap were popped last slice
        dets = _points(detections)
        ends = _points([t.latest for t in candidates])
        dist = _in_plane_distances(dets, ends)
        radius = np.maximum(self.spec.link_distance_mm, 0.5 * np.maximum(dets[:, None, 4], ends[None, :, 4]))
        dist[dist > radius] = np.inf
        for n, det in enumerate(detections):
            best = int(np.argmin(dist[n])) if candidates else -1
            if best >= 0 and np.isfinite(dist[n, best]):
                dist[:, best] = np.inf  # one detection per track per slice
                candidates[best].detections.append(det)
                candidates[best].last_index = self._index
            else:
                self._tracks.append(_Track(det, self._index))

    def _pop_complete(self, is_complete) -> List[Finding]:
        done = [t for t in self._tracks if is_complete(t)]
        self._tracks = [t for t in self._tracks if not is_complete(t)]
        findings = [self._finding(t) for t in done if len(t.detections) >= self.spec.min_slices]
        findings.sort(key=lambda f: f.key_slice_location * (self._direction or 1))
        return findings

    def _finding(self, track: _Track) -> Finding:
        dets = track.detections
        scores = np.array([d.score for d in dets])
        xyz = np.array([[d.x, d.y, d.z] for d in dets])
        weights = scores if scores.sum() > 0 else np.ones_like(scores)
        centre = weights @ xyz / weights.sum()
        key = dets[int(np.argmax(scores))]
        diameter = max(d.diameter_mm for d in dets)
        first, last = dets[0].slice_location, dets[-1].slice_location
        extent = abs(last - first)
        max_score = float(scores.max())
        ends = _points([dets[0], dets[-1]])
        finding = Finding(
            x=float(centre[0]),
            y=float(centre[1]),
            z=float(centre[2]),
            diameter_mm=float(diameter),
            probability=0.0,  # set below, from these measurements
            max_score=max_score,
            n_slices=len(dets),
            z_extent_mm=float(extent),
            first_slice_location=float(first),
            last_slice_location=float(last),
            key_slice_location=float(key.slice_location),
            slice_spacing_mm=float(self._spacing),
            mean_score=float(scores.mean()),
            end_diameter_ratio=float((dets[0].diameter_mm + dets[-1].diameter_mm) / (2 * diameter)) if diameter > 0 else 1.0,
            end_score_ratio=float((scores[0] + scores[-1]) / (2 * max_score)) if max_score > 0 else 1.0,
            drift_mm=float(_in_plane_distances(ends[:1], ends[1:])[0, 0]),
        )
        if self.spec.rescorer is not None:
            probability = self.spec.rescorer.probability(finding)
        else:
            probability = shape_prior(max_score, extent, self._spacing, diameter, self.spec)
        return dataclasses.replace(finding, probability=float(probability))
