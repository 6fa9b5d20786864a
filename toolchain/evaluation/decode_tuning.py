"""Choose the decode spec's 3-D shape prior (``max_elongation``, ``min_z_span``) on validation series.

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
from edge.errors import InputError
from toolchain.evaluation.froc import Candidates, Nodules, evaluate_froc
from toolchain.evaluation.io import read_annotations, read_series_list


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


def rescored_cpm(findings: Dict[str, List[Finding]], folder: AnnotatedFolder, spec: DecodeSpec) -> float:
    """CPM of ``findings`` (per series UID, found without a shape prior) under ``spec``'s prior."""
    uids, centres, probs = [], [], []
    for uid, found in findings.items():
        for f in found:
            uids.append(uid)
            centres.append((f.x, f.y, f.z))
            probs.append(shape_prior(f.max_score, f.z_extent_mm, f.slice_spacing_mm, f.diameter_mm, spec))
    candidates = Candidates(tuple(uids), np.array(centres, float).reshape(-1, 3), np.array(probs, float))
    return float(evaluate_froc(folder.nodules, candidates, folder.scans).cpm)


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


def detect_without_shape_prior(folder: AnnotatedFolder, runner, specs) -> Dict[str, List[Finding]]:
    """Findings per series UID of ``folder``, decoded with ``specs`` but no shape prior."""
    from edge.offline import detect_folder

    run = detect_folder(folder.path, runner, dataclasses.replace(specs, decode=shape_free(specs.decode)))
    return {s.series_uid: list(s.findings) for s in run.series}
