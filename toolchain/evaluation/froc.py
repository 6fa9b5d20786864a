"""FROC curve and CPM exactly as LUNA16's ``noduleCADEvaluationLUNA16.py`` computes them.

Matching (per scan, coordinates in mm):

- a candidate hits a nodule when its squared Euclidean distance to the nodule
  centre is *strictly* below ``(diameter / 2) ** 2`` (``dist < radiusSquared``
  in the official script): a candidate exactly at the radius is a miss;
- a negative diameter means "unknown" and is read as 10 mm (official rule,
  used by ``annotations_excluded.csv``);
- each nodule is counted once, with the highest probability of the candidates
  that hit it; its other hits are neither TP nor FP (``doubleCandidatesIgnored``);
  a candidate that hits two nodules counts for both;
- candidates hitting an *excluded* nodule ("irrelevant findings") are dropped,
  neither TP nor FP; without an exclusion list nothing is dropped this way;
- every other candidate is a FP, including all candidates of a scan without nodules;
- before matching, each scan keeps at most ``max_marks_per_scan`` marks (the
  official evaluation passes 100), with the official selection rule.

Curve: the official ``computeFROC``: an ROC curve over the detected nodules'
probabilities and the FP probabilities (a replica of scikit-learn's
``roc_curve`` with ``drop_intermediate=True``, so that ``np.interp`` sees the
same points), FP/scan = FP / number of scans, sensitivity scaled by
detected / all nodules (missed nodules are never reached). CPM is the mean of
``np.interp`` of that curve at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/scan;
``np.interp`` holds the last sensitivity beyond the curve's largest FP/scan.
(The official script itself only samples the curve on ``linspace(1/8, 8, 10001)``,
a grid that misses most of the seven points; we interpolate at the points.)
Where the official script yields NaN or fails (no nodule detected, or no
candidate) the sensitivity is 0 everywhere, its limit.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge.errors import ConfigError, EdgeError

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The seven FP/scan operating points whose mean sensitivity is the CPM."""

MAX_MARKS_PER_SCAN = 100
UNKNOWN_DIAMETER_MM = 10.0
MISSED_PROBABILITY = -1000000000.0  # official minProbValue for missed nodules


@dataclass(frozen=True)
class Nodules:
    """Annotated nodules: one row each, in file order (``annotations.csv``)."""

    seriesuids: Tuple[str, ...]
    centers: np.ndarray  # (N, 3) x, y, z in mm
    diameters: np.ndarray  # (N,) mm; negative = unknown (read as 10 mm)

    def __len__(self):
        return len(self.seriesuids)

    def hit_radius_squared(self) -> np.ndarray:
        d = np.where(self.diameters < 0.0, UNKNOWN_DIAMETER_MM, self.diameters)
        return (d / 2.0) ** 2.0


@dataclass(frozen=True)
class Candidates:
    """CAD marks: one row each, in file order (``predictions.csv``)."""

    seriesuids: Tuple[str, ...]
    centers: np.ndarray  # (M, 3) x, y, z in mm
    probabilities: np.ndarray  # (M,)

    def __len__(self):
        return len(self.seriesuids)


@dataclass(frozen=True)
class Matching:
    """The official FROC vectors plus per-nodule outcomes and counts.

    ``is_nodule``/``probability``/``missed`` are FROCGTList/FROCProbList/excludeList;
    ``scan_index`` is FPDivisorList as an index into ``scans``.
    """

    scans: Tuple[str, ...]
    is_nodule: np.ndarray
    probability: np.ndarray
    missed: np.ndarray
    scan_index: np.ndarray
    nodule_probability: np.ndarray  # per nodule row: best hit probability, NaN if missed or not evaluated
    nodule_evaluated: np.ndarray  # per nodule row: its scan is in ``scans``
    counts: Dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FrocCurve:
    """FROC points (after the ROC replica's ``drop_intermediate``) and their thresholds."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray  # first is +inf (nothing accepted)

    def sensitivity_at(self, fp_rates: Sequence[float] = FP_RATES) -> np.ndarray:
        return np.interp(np.asarray(fp_rates, float), self.fps_per_scan, self.sensitivity)


@dataclass(frozen=True)
class FrocResult:
    matching: Matching
    curve: FrocCurve
    fp_rates: Tuple[float, ...]
    sensitivities: np.ndarray

    @property
    def cpm(self) -> float:
        return float(np.mean(self.sensitivities))


def resolve_scans(
    nodules: Nodules,
    candidates: Candidates,
    series_uids: Optional[Sequence[str]] = None,
    n_scans: Optional[int] = None,
) -> Tuple[Tuple[str, ...], str]:
    """The scans that count in FP/scan and a line saying where they came from.

    A series list wins; else ``n_scans`` (the series seen in the files plus
    unnamed scans without findings); else the union of series in both tables.
    """
    seen = list(dict.fromkeys(tuple(nodules.seriesuids) + tuple(candidates.seriesuids)))
    if series_uids is not None:
        scans = tuple(dict.fromkeys(series_uids))
        if n_scans is not None and n_scans != len(scans):
            raise ConfigError(f"--scans {n_scans} disagrees with the series list ({len(scans)} series)")
        return scans, f"{len(scans)} scans from the series list"
    if n_scans is not None:
        if n_scans < len(seen):
            raise ConfigError(f"--scans {n_scans} is less than the {len(seen)} series named in the files")
        extra = tuple(f"<scan without findings {i}>" for i in range(n_scans - len(seen)))
        return tuple(seen) + extra, f"{n_scans} scans as given ({len(seen)} named in the files)"
    return tuple(seen), (
        f"{len(seen)} scans: union of series in predictions and annotations "
        "(scans without nodules or candidates are not counted; pass --scans or --series-list)"
    )


def _rows_by_scan(seriesuids: Sequence[str]) -> Dict[str, List[int]]:
    rows: Dict[str, List[int]] = {}
    for i, uid in enumerate(seriesuids):
        rows.setdefault(uid, []).append(i)
    return rows


def _keep_most_suspicious(rows: List[int], probabilities: np.ndarray, max_marks: int) -> List[int]:
    """The official cap: marks strictly above the (max+1)-th highest probability, at most max, in file order."""
    if max_marks <= 0 or len(rows) <= max_marks:
        return rows
    threshold = sorted((float(probabilities[r]) for r in rows), reverse=True)[max_marks]
    return [r for r in rows if float(probabilities[r]) > threshold][:max_marks]


def match_candidates(
    nodules: Nodules,
    candidates: Candidates,
    scans: Sequence[str],
    excluded: Optional[Nodules] = None,
    max_marks_per_scan: Optional[int] = MAX_MARKS_PER_SCAN,
) -> Matching:
    """Assign candidates to nodules per scan, building the official FROC vectors."""
    scans = tuple(scans)
    scan_set = set(scans)
    nodule_rows = _rows_by_scan(nodules.seriesuids)
    candidate_rows = _rows_by_scan(candidates.seriesuids)
    excluded_rows = _rows_by_scan(excluded.seriesuids) if excluded is not None else {}
    nodule_r2 = nodules.hit_radius_squared()
    excluded_r2 = excluded.hit_radius_squared() if excluded is not None else None

    is_nodule, probability, missed, scan_index = [], [], [], []
    nodule_probability = np.full(len(nodules), np.nan)
    counts = dict.fromkeys(
        ("candidates", "candidates_over_max_marks", "true_positives", "false_positives", "false_negatives",
         "double_detections_ignored", "irrelevant_candidates"), 0)

    for s, uid in enumerate(scans):
        rows = candidate_rows.get(uid, [])
        kept = _keep_most_suspicious(rows, candidates.probabilities, max_marks_per_scan or 0)
        counts["candidates"] += len(kept)
        counts["candidates_over_max_marks"] += len(rows) - len(kept)
        kept = np.asarray(kept, dtype=np.int64)
        centers = candidates.centers[kept]
        probs = candidates.probabilities[kept]
        remaining = np.ones(len(kept), bool)

        for n in nodule_rows.get(uid, []):
            d2 = np.sum((centers - nodules.centers[n]) ** 2.0, axis=1)
            hits = d2 < nodule_r2[n]
            remaining &= ~hits
            is_nodule.append(1.0)
            scan_index.append(s)
            if hits.any():
                best = float(np.max(probs[hits]))
                nodule_probability[n] = best
                probability.append(best)
                missed.append(False)
                counts["true_positives"] += 1
                counts["double_detections_ignored"] += int(hits.sum()) - 1
            else:
                probability.append(MISSED_PROBABILITY)
                missed.append(True)
                counts["false_negatives"] += 1

        for e in excluded_rows.get(uid, []):
            d2 = np.sum((centers - excluded.centers[e]) ** 2.0, axis=1)
            irrelevant = remaining & (d2 < excluded_r2[e])
            counts["irrelevant_candidates"] += int(irrelevant.sum())
            remaining &= ~irrelevant

        for p in probs[remaining]:
            is_nodule.append(0.0)
            probability.append(float(p))
            missed.append(False)
            scan_index.append(s)
        counts["false_positives"] += int(remaining.sum())

    counts["scans"] = len(scans)
    counts["nodules"] = counts["true_positives"] + counts["false_negatives"]
    counts["nodules_outside_scans"] = sum(1 for u in nodules.seriesuids if u not in scan_set)
    counts["candidates_outside_scans"] = sum(1 for u in candidates.seriesuids if u not in scan_set)
    return Matching(
        scans=scans,
        is_nodule=np.asarray(is_nodule, float),
        probability=np.asarray(probability, float),
        missed=np.asarray(missed, bool),
        scan_index=np.asarray(scan_index, np.int64),
        nodule_probability=nodule_probability,
        nodule_evaluated=np.array([u in scan_set for u in nodules.seriesuids], bool),
        counts=counts,
    )


def _roc_counts(y_true: np.ndarray, y_score: np.ndarray):
    """scikit-learn ``roc_curve`` (drop_intermediate=True) as raw TP/FP counts per threshold."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score = y_score[order]
    y_true = y_true[order]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idx = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idx]
    fps = 1 + threshold_idx - tps
    thresholds = y_score[threshold_idx]
    if len(fps) > 2:
        optimal = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[optimal], tps[optimal], thresholds[optimal]
    return np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, thresholds]


def froc_curve(is_nodule: np.ndarray, probability: np.ndarray, missed: np.ndarray, n_scans: int) -> FrocCurve:
    """The official ``computeFROC`` (FROCGTList, FROCProbList, totalNumberOfImages, excludeList)."""
    is_nodule = np.asarray(is_nodule, float)
    probability = np.asarray(probability, float)
    local = ~np.asarray(missed, bool)
    total_lesions = float(np.sum(is_nodule))
    if total_lesions == 0:
        raise EdgeError("no annotated nodule in the evaluated scans: sensitivity is undefined")
    y_true = is_nodule[local]
    detected = float(np.sum(y_true))
    n_false = y_true.size - detected
    if y_true.size == 0 or detected == 0:
        fp_count = 0 if y_true.size == 0 else n_false
        return FrocCurve(np.array([0.0, fp_count / n_scans]), np.zeros(2), np.array([np.inf, -np.inf]))
    tps, fps, thresholds = _roc_counts(y_true, probability[local])
    if n_false == 0:
        fps_per_scan = np.zeros(len(fps))
    else:
        fps_per_scan = (fps / fps[-1]) * n_false / n_scans
    sensitivity = (tps / tps[-1]) * detected / total_lesions
    return FrocCurve(fps_per_scan, sensitivity, thresholds)


def evaluate_froc(
    nodules: Nodules,
    candidates: Candidates,
    scans: Sequence[str],
    excluded: Optional[Nodules] = None,
    max_marks_per_scan: Optional[int] = MAX_MARKS_PER_SCAN,
    fp_rates: Sequence[float] = FP_RATES,
) -> FrocResult:
    """Match, build the FROC curve and read the sensitivities at ``fp_rates`` (CPM = their mean)."""
    if not scans:
        raise EdgeError("no scans to evaluate")
    matching = match_candidates(nodules, candidates, scans, excluded, max_marks_per_scan)
    curve = froc_curve(matching.is_nodule, matching.probability, matching.missed, len(matching.scans))
    return FrocResult(matching, curve, tuple(float(r) for r in fp_rates), curve.sensitivity_at(fp_rates))


def threshold_at_fp_rate(matching: Matching, fp_rate: float) -> float:
    """Lowest candidate probability whose accepted FPs stay within ``fp_rate`` FP/scan.

    A mark is accepted when its probability is >= the threshold. +inf when even
    the most suspicious FP exceeds the rate; the lowest probability when all fit.
    This is a vertex of the FROC curve at or left of ``fp_rate``: no interpolation.
    """
    scores = matching.probability[~matching.missed]
    fp_probs = np.sort(matching.probability[(matching.is_nodule == 0) & ~matching.missed])[::-1]
    allowed = int(np.floor(fp_rate * len(matching.scans) + 1e-9))
    if allowed >= len(fp_probs):
        return float(scores.min()) if scores.size else np.inf
    # Accepting the (allowed+1)-th most suspicious FP would exceed the rate.
    above = scores[scores > fp_probs[allowed]]
    return float(above.min()) if above.size else np.inf


def per_type_sensitivity(
    matching: Matching,
    groups: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float],
) -> Dict[str, Dict[str, dict]]:
    """Sensitivity of each nodule group at each named threshold.

    ``groups`` maps a group name to a boolean mask over the nodule rows; only
    nodules of evaluated scans count. A nodule is detected at threshold ``t``
    when its best hit has probability >= ``t``. Returns
    ``{group: {threshold_name: {"threshold", "detected", "nodules", "sensitivity"}}}``
    with sensitivity None for an empty group.
    """
    out: Dict[str, Dict[str, dict]] = {}
    best = np.where(np.isnan(matching.nodule_probability), -np.inf, matching.nodule_probability)
    for name, mask in groups.items():
        members = np.asarray(mask, bool) & matching.nodule_evaluated
        total = int(members.sum())
        out[name] = {}
        for label, t in thresholds.items():
            detected = int(np.sum(members & (best >= t) & np.isfinite(best)))
            out[name][label] = {
                "threshold": float(t),
                "detected": detected,
                "nodules": total,
                "sensitivity": detected / total if total else None,
            }
    return out


SMALL_NODULE_MM = 6.0


@dataclass(frozen=True)
class NoduleMeta:
    """Per-nodule descriptors aligned with the rows of a :class:`Nodules` table ("" = not given)."""

    types: Tuple[str, ...]
    locations: Tuple[str, ...]
    diameters: np.ndarray  # mm; NaN where the meta file gives none


def nodule_groups(nodules: Nodules, meta: Optional[NoduleMeta] = None) -> Dict[str, np.ndarray]:
    """Boolean nodule masks: all, size (< 6 mm / >= 6 mm), and each type and location in ``meta``.

    Size uses the meta diameter where given, else the annotated one.
    """
    diameters = np.asarray(nodules.diameters, float)
    if meta is not None:
        diameters = np.where(np.isfinite(meta.diameters), meta.diameters, diameters)
    groups = {
        "all": np.ones(len(nodules), bool),
        f"size:<{SMALL_NODULE_MM:g}mm": (diameters >= 0) & (diameters < SMALL_NODULE_MM),
        f"size:>={SMALL_NODULE_MM:g}mm": diameters >= SMALL_NODULE_MM,
    }
    if meta is not None:
        for kind, values in (("type", meta.types), ("location", meta.locations)):
            values = np.asarray(values, dtype=object)
            for value in sorted(set(values) - {""}):
                groups[f"{kind}:{value}"] = values == value
    return groups
