"""Offline detection over a folder of DICOM series (``edge detect``): LUNA16 predictions out."""

import csv
import logging
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Optional, Tuple

from edge.backends.base import Runner
from edge.decode.findings import Finding
from edge.decode.peaks import SliceDetection
from edge.detector import SeriesDetector
from edge.errors import InputError
from edge.folder import Rejection, SeriesFiles, group_series, load_series
from edge.model_file import ModelSpecs

log = logging.getLogger(__name__)

PREDICTION_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm")


@dataclass
class SeriesResult:
    series_uid: str
    n_slices: int
    findings: List[Finding]
    image_z: List[float] = field(default_factory=list)  # patient z of every image, in slice order
    slice_detections: List[Tuple[float, SliceDetection]] = field(default_factory=list)  # (image z, 2-D detection)


@dataclass
class DetectionRun:
    series: List[SeriesResult] = field(default_factory=list)
    rejected: List[Rejection] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def detect_folder(
    root,
    runner: Runner,
    specs: ModelSpecs,
    min_slices: int = 3,
    on_series: Optional[Callable[[SeriesResult], None]] = None,
    workers: int = 1,
    record: Optional[Callable[[str, float], None]] = None,
    batch_size: int = 4,
) -> DetectionRun:
    """Detect nodules in every CT series under ``root``; unusable files and series are reported, not fatal.

    ``workers`` series are decoded and detected at once, in threads sharing ``runner`` (ONNX Runtime
    runs release the GIL; give the runner ``cores / workers`` intra-op threads). Results, rejections
    and ``on_series`` calls come in the folder's series order whatever the number of workers, and
    memory holds at most ``workers`` decoded series. ``record(stage, seconds)`` (called from the worker
    threads) receives every timing: ``scan`` and ``decode`` per file, ``preprocess`` per slice, ``infer``
    and ``postprocess`` per slice (a batch's time divided by its size).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    groups, rejected = group_series(root, record)
    run = DetectionRun(rejected=rejected)
    timings: Dict[str, List[float]] = defaultdict(list)

    def detect_one(group: SeriesFiles) -> _SeriesOutcome:
        image_z: List[float] = []
        per_slice: List[Tuple[float, SliceDetection]] = []

        def on_slice(geometry, detections):
            z = float(geometry.position[2])
            image_z.append(z)
            per_slice.extend((z, d) for d in detections)

        frames, bad = load_series(group, record)
        if len(frames) < min_slices:
            already = {b.path for b in bad}
            reason = f"series has {len(frames)} usable slice(s), at least {min_slices} needed"
            return _SeriesOutcome(None, bad + [Rejection(p, reason) for p in group.paths if p not in already], {})
        detector = SeriesDetector(runner, specs, batch_size, on_slice=on_slice, record=record)
        try:
            findings = detector.detect(frames)
        except InputError as e:
            return _SeriesOutcome(None, bad + [Rejection(e.path, f"series {group.series_uid} skipped: {e.reason}")],
                                  detector.timings)
        return _SeriesOutcome(SeriesResult(group.series_uid, len(frames), findings, image_z, per_slice), bad,
                              detector.timings)

    if workers == 1:
        outcomes = map(detect_one, groups)
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="detect")
        outcomes = _bounded_map(pool, detect_one, groups, workers)
    try:
        for outcome in outcomes:
            run.rejected += outcome.rejected
            for stage, values in outcome.timings.items():
                timings[stage] += values
            if outcome.result is not None:
                run.series.append(outcome.result)
                if on_series:
                    on_series(outcome.result)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    run.timings = {k: sum(v) / len(v) for k, v in timings.items() if v}
    return run


@dataclass
class _SeriesOutcome:
    result: Optional[SeriesResult]
    rejected: List[Rejection]
    timings: Dict[str, List[float]]


def _bounded_map(pool: ThreadPoolExecutor, fn, items, in_flight: int) -> Iterator:
    """``pool.map`` that submits at most ``in_flight`` items ahead of the one being consumed (bounded memory)."""
    pending: Deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_predictions_csv(path, run: DetectionRun) -> None:
    """LUNA16 predictions (plus a diameter column, which LUNA16 readers ignore)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_HEADER)
        for s in run.series:
            for fd in s.findings:
                w.writerow([s.series_uid, f"{fd.x:.3f}", f"{fd.y:.3f}", f"{fd.z:.3f}", f"{fd.probability:.6f}", f"{fd.diameter_mm:.2f}"])


def write_slice_predictions_csv(path, run: DetectionRun) -> None:
    """Per-slice 2-D detections for per-image metrics (``tools/evaluate.py --slice-predictions``).

    coordZ is the z of the image the detection was made on (ImagePositionPatient),
    probability the detection's own heatmap score (no 3-D aggregation).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_HEADER[:5])
        for s in run.series:
            for z, d in s.slice_detections:
                w.writerow([s.series_uid, f"{d.x:.3f}", f"{d.y:.3f}", f"{z:.3f}", f"{d.score:.6f}"])


def write_image_positions_csv(path, run: DetectionRun) -> None:
    """One row per image: seriesuid, coordZ (``tools/evaluate.py --slices``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("seriesuid", "coordZ"))
        for s in run.series:
            for z in s.image_z:
                w.writerow([s.series_uid, f"{z:.3f}"])


def write_rejections_csv(path, run: DetectionRun) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "reason"))
        for r in run.rejected:
            w.writerow((r.path, r.reason))
