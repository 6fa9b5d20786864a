"""Choose the decode spec on validation series: the 3-D shape prior (``max_elongation``, ``min_z_span``)
or the false-positive rescorer (:mod:`toolchain.evaluation.rescorer_fit`), and the report threshold.

The network runs once per series, with the shape prior switched off; every
candidate prior then rescores the same findings (:func:`edge.decode.findings.shape_prior`
is a function of a finding's own measurements), so a grid costs one detection
pass. The choice maximises the mean CPM over the given annotated folders. Tune
on validation series only: a prior chosen on the test split makes its CPM a
training number.
"""

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge.decode.findings import Finding, shape_prior
from edge.decode.spec import DecodeSpec
from edge.errors import ConfigError, InputError
from toolchain.evaluation.froc import Nodules
from toolchain.evaluation.io import read_annotations, read_series_list
from toolchain.evaluation.rescorer_fit import (cross_validated_probabilities, findings_cpm, fit_rescorer_on,
                                               folds_by_uid, rescorer_trials, threshold_at)


@dataclass(frozen=True)
class AnnotatedFolder:
    """A folder of DICOM series with its LUNA16 annotations and the list of every series in it."""

    path: Path
    nodules: Nodules
    scans: Tuple[str, ...]

    @classmethod
    def open(cls, path) -> "AnnotatedFolder":
        path = Path(path)
        for name in ("annotations.csv", "series.csv"):
            if not (path / name).is_file():
                raise InputError(path, f"missing {name} (a folder from tools/make_dataset.py or in its layout)")
        return cls(path, read_annotations(path / "annotations.csv"), read_series_list(path / "series.csv"))


@dataclass(frozen=True)
class GridPoint:
    max_elongation: Optional[float]
    min_z_span: Optional[float]
    cpm: Tuple[float, ...]  # one per folder

    @property
    def mean_cpm(self) -> float:
        return float(np.mean(self.cpm))


def shape_free(spec: DecodeSpec) -> DecodeSpec:
    return dataclasses.replace(spec, max_elongation=None, min_z_span=None, rescorer=None)


def shape_prior_probabilities(findings: Dict[str, List[Finding]], spec: DecodeSpec) -> Dict[str, np.ndarray]:
    """Per series UID, the probability ``spec``'s shape prior gives each finding (found without a prior)."""
    return {uid: np.array([shape_prior(f.max_score, f.z_extent_mm, f.slice_spacing_mm, f.diameter_mm, spec)
                           for f in found], float) for uid, found in findings.items()}


def rescored_cpm(findings: Dict[str, List[Finding]], folder: AnnotatedFolder, spec: DecodeSpec) -> float:
    """CPM of ``findings`` (per series UID, found without a shape prior) under ``spec``'s prior."""
    return findings_cpm(findings, shape_prior_probabilities(findings, spec), folder.nodules, folder.scans)


def grid_search(findings_per_folder: Sequence[Dict[str, List[Finding]]], folders: Sequence[AnnotatedFolder],
                base: DecodeSpec, max_elongations: Sequence[Optional[float]],
                min_z_spans: Sequence[Optional[float]]) -> List[GridPoint]:
    """Every (max_elongation, min_z_span) pair scored on every folder, best mean CPM first (ties: grid order)."""
    points = []
    for me, ms in itertools.product(max_elongations, min_z_spans):
        spec = dataclasses.replace(base, max_elongation=me, min_z_span=ms)
        cpm = tuple(rescored_cpm(f, folder, spec) for f, folder in zip(findings_per_folder, folders))
        points.append(GridPoint(me, ms, cpm))
    order = sorted(range(len(points)), key=lambda i: (-points[i].mean_cpm, i))
    return [points[i] for i in order]


def _series_subset(findings: Dict[str, List[Finding]], folder: AnnotatedFolder, keep) -> tuple:
    """The findings, nodules and scans of ``folder`` whose series UID ``keep`` accepts."""
    mask = np.array([keep(u) for u in folder.nodules.seriesuids], bool)
    nodules = Nodules(tuple(u for u, m in zip(folder.nodules.seriesuids, mask) if m),
                      folder.nodules.centers.reshape(-1, 3)[mask], folder.nodules.diameters[mask])
    return {u: f for u, f in findings.items() if keep(u)}, nodules, tuple(u for u in folder.scans if keep(u))


def cross_validated_prior_cpm(findings_per_folder: Sequence[Dict[str, List[Finding]]],
                              folders: Sequence[AnnotatedFolder], base: DecodeSpec,
                              max_elongations: Sequence[Optional[float]], min_z_spans: Sequence[Optional[float]],
                              folds: int = 5) -> Tuple[float, ...]:
    """CPM per folder, each series scored by the grid's best shape prior on the other folds' series.

    The folds are the rescorer's (:func:`~toolchain.evaluation.rescorer_fit.folds_by_uid`), so the two
    cross-validated numbers compare like with like; the grid's in-sample best is optimistic by the
    number of pairs it picked from.
    """
    specs = [dataclasses.replace(base, max_elongation=me, min_z_span=ms)
             for me, ms in itertools.product(max_elongations, min_z_spans)]
    probs = [[shape_prior_probabilities(f, spec) for f in findings_per_folder] for spec in specs]
    fold_of = folds_by_uid(findings_per_folder, folds)
    held_out: List[Dict[str, np.ndarray]] = [{} for _ in findings_per_folder]
    for k in range(folds):
        parts = [(j,) + _series_subset(f, folder, lambda uid: fold_of.get(uid, -1) != k)
                 for j, (f, folder) in enumerate(zip(findings_per_folder, folders))]
        parts = [p for p in parts if p[3] and len(p[2])]  # a folder part without scans or nodules has no CPM

        def training_cpm(i: int) -> float:
            return float(np.mean([findings_cpm(f, {u: probs[i][j][u] for u in f}, n, s) for j, f, n, s in parts]))

        best = max(range(len(specs)), key=lambda i: (training_cpm(i), -i)) if parts else 0  # ties: grid order
        for j, findings in enumerate(findings_per_folder):
            for uid in findings:
                if fold_of[uid] == k:
                    held_out[j][uid] = probs[best][j][uid]
    return tuple(findings_cpm(f, p, folder.nodules, folder.scans)
                 for f, p, folder in zip(findings_per_folder, held_out, folders))


@dataclass(frozen=True)
class DecodeTuning:
    """What :func:`tune_decode_spec` chose, and the evidence."""

    spec: DecodeSpec
    grid: List[GridPoint]  # best first
    rescorer_trials: List[dict]  # {"l2", "cpm" per folder, "mean_cpm"}, cross-validated; [] when not tried
    prior_cross_validated: Optional[Tuple[float, ...]]  # CPM per folder; None when the rescorer was not tried
    rescorer_l2: Optional[float]  # the penalty of the rescorer in ``spec``; None: the shape prior was kept

    @property
    def prior_cross_validated_mean(self) -> Optional[float]:
        """The mean over folders of :attr:`prior_cross_validated` (what the rescorer had to beat)."""
        cv = self.prior_cross_validated
        return None if cv is None else float(np.mean(cv))


def tune_decode_spec(findings_per_folder: Sequence[Dict[str, List[Finding]]], folders: Sequence[AnnotatedFolder],
                     base: DecodeSpec, max_elongations: Sequence[Optional[float]],
                     min_z_spans: Sequence[Optional[float]], rescorer_l2: Sequence[float] = (), folds: int = 5,
                     report_fp_per_scan: float = 1.0) -> DecodeTuning:
    """The best shape prior of the grid; with ``rescorer_l2`` penalties, the rescorer instead when its
    cross-validated mean CPM beats the shape prior's, cross-validated on the same folds
    (:func:`cross_validated_prior_cpm`); and the report threshold at ``report_fp_per_scan`` false
    positives per scan over all folders (the rescorer's from its cross-validated probabilities)."""
    if not report_fp_per_scan > 0:
        raise ConfigError(f"report operating point must be > 0 false positives per scan, got {report_fp_per_scan}")
    points = grid_search(findings_per_folder, folders, base, max_elongations, min_z_spans)
    best = points[0]
    spec = dataclasses.replace(base, max_elongation=best.max_elongation, min_z_span=best.min_z_span, rescorer=None)
    nodules, scans = [f.nodules for f in folders], [f.scans for f in folders]
    trials, chosen_l2, prior_cv = [], None, None
    if rescorer_l2:
        trials = rescorer_trials(findings_per_folder, nodules, scans, rescorer_l2, folds)
        prior_cv = cross_validated_prior_cpm(findings_per_folder, folders, base, max_elongations, min_z_spans, folds)
        top = max(trials, key=lambda r: r["mean_cpm"])
        if top["mean_cpm"] > float(np.mean(prior_cv)):
            chosen_l2 = top["l2"]
            spec = dataclasses.replace(spec, rescorer=fit_rescorer_on(findings_per_folder, nodules, chosen_l2))
    if chosen_l2 is not None:
        probabilities = cross_validated_probabilities(findings_per_folder, nodules, chosen_l2, folds)
    else:
        probabilities = [shape_prior_probabilities(per_folder, spec) for per_folder in findings_per_folder]
    threshold = threshold_at(findings_per_folder, probabilities, nodules, scans, report_fp_per_scan)
    spec = dataclasses.replace(spec, report_threshold=round(min(threshold, 1.0), 6))
    return DecodeTuning(spec, points, trials, prior_cv, chosen_l2)


def detect_without_shape_prior(folder: AnnotatedFolder, runner, specs) -> Dict[str, List[Finding]]:
    """Findings per series UID of ``folder``, decoded with ``specs`` but no shape prior."""
    from edge.offline import detect_folder

    run = detect_folder(folder.path, runner, dataclasses.replace(specs, decode=shape_free(specs.decode)))
    return {s.series_uid: list(s.findings) for s in run.series}
