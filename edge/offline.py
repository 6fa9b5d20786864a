"""Offline detection over a folder of DICOM series (``edge detect``): LUNA16 predictions out."""

import csv
import logging
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from edge.backends.base import Runner
from edge.decode.findings import Finding
from edge.decode.peaks import SliceDetection
from edge.detector import SeriesDetector
from edge.errors import InputError
from edge.folder import (Rejection, SeriesFiles, check_folder, group_scanned, group_series, iter_files, load_series,
                         scan_file)
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


def detect_series(group: SeriesFiles, runner: Runner, specs: ModelSpecs, min_slices: int = 3, batch_size: int = 4,
                  record: Optional[Callable[[str, float], None]] = None) -> "SeriesOutcome":
    """Decode and detect one series; its unusable files (or the whole series) become rejections.

    The outcome's timings hold every stage (``decode`` per file, then the detector's); ``record`` also
    receives them as they happen."""
    image_z: List[float] = []
    per_slice: List[Tuple[float, SliceDetection]] = []
    timings: Dict[str, List[float]] = defaultdict(list)

    def timed(stage: str, seconds: float) -> None:
        timings[stage].append(seconds)
        if record is not None:
            record(stage, seconds)

    def on_slice(geometry, detections):
        z = float(geometry.position[2])
        image_z.append(z)
        per_slice.extend((z, d) for d in detections)

    frames, bad = load_series(group, timed)
    if len(frames) < min_slices:
        already = {b.path for b in bad}
        reason = f"series has {len(frames)} usable slice(s), at least {min_slices} needed"
        return SeriesOutcome(None, bad + [Rejection(p, reason) for p in group.paths if p not in already],
                             dict(timings))
    detector = SeriesDetector(runner, specs, batch_size, on_slice=on_slice, record=timed)
    try:
        findings = detector.detect(frames)
    except InputError as e:
        return SeriesOutcome(None, bad + [Rejection(e.path, f"series {group.series_uid} skipped: {e.reason}")],
                             dict(timings))
    return SeriesOutcome(SeriesResult(group.series_uid, len(frames), findings, image_z, per_slice), bad,
                         dict(timings))


@dataclass
class SeriesOutcome:
    """One series' result (None when it was skipped), its rejections and its stage timings (seconds)."""

    result: Optional[SeriesResult]
    rejected: List[Rejection]
    timings: Dict[str, List[float]]


def detect_folder(
    root,
    runner: Runner,
    specs: ModelSpecs,
    min_slices: int = 3,
    on_series: Optional[Callable[[SeriesResult], None]] = None,
    record: Optional[Callable[[str, float], None]] = None,
    batch_size: int = 4,
) -> DetectionRun:
    """Detect nodules in every CT series under ``root``; unusable files and series are reported, not fatal.

    One series at a time, so memory holds one decoded series; :class:`ProcessPoolDetector` spreads the
    series over worker processes. ``record(stage, seconds)`` receives every timing: ``scan`` and
    ``decode`` per file, ``preprocess`` per slice, ``infer`` and ``postprocess`` per slice (a batch's
    time divided by its size).
    """
    groups, rejected = group_series(root, record)
    outcomes = (detect_series(g, runner, specs, min_slices, batch_size, record) for g in groups)
    return _collect(rejected, outcomes, on_series)


def _collect(rejected: List[Rejection], outcomes: Iterable[SeriesOutcome],
             on_series: Optional[Callable[[SeriesResult], None]],
             record: Optional[Callable[[str, float], None]] = None) -> DetectionRun:
    """Series outcomes, in order, into one run (``record`` gets their timings, when they were not recorded live)."""
    run = DetectionRun(rejected=list(rejected))
    timings: Dict[str, List[float]] = defaultdict(list)
    for outcome in outcomes:
        run.rejected += outcome.rejected
        for stage, values in outcome.timings.items():
            timings[stage] += values
            if record is not None:
                for seconds in values:
                    record(stage, seconds)
        if outcome.result is not None:
            run.series.append(outcome.result)
            if on_series:
                on_series(outcome.result)
    run.timings = {k: sum(v) / len(v) for k, v in timings.items() if v}
    return run


def _bounded_map(pool: ProcessPoolExecutor, fn, items, in_flight: int) -> Iterator:
    """``pool.map`` that submits at most ``in_flight`` items ahead of the one being consumed (bounded memory)."""
    pending: Deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


# --- worker processes

_WORKER: dict = {}  # in each worker process: its runner, specs and settings


def _start_worker(model_path: str, intra_op_threads: int, batch_size: int, min_slices: int) -> None:
    import cv2

    cv2.setNumThreads(intra_op_threads)
    from edge.backends.onnxruntime_runner import open_onnxruntime_runner

    runner, specs = open_onnxruntime_runner(model_path, intra_op_threads=intra_op_threads)
    _WORKER.update(runner=runner, specs=specs, batch_size=batch_size, min_slices=min_slices)


def _scan_chunk(paths: List[str]) -> Tuple[list, List[float]]:
    scans, seconds = [], []
    for p in paths:
        t0 = time.perf_counter()
        scans.append((p, scan_file(p)))
        seconds.append(time.perf_counter() - t0)
    return scans, seconds


def _detect_in_worker(group: SeriesFiles) -> SeriesOutcome:
    w = _WORKER
    return detect_series(group, w["runner"], w["specs"], w["min_slices"], w["batch_size"])


class ProcessPoolDetector:
    """``edge detect`` over ``workers`` processes, each with its own ONNX Runtime session of ``model_path``.

    The folder scan is split among the workers, then each series is decoded, preprocessed and detected
    in one worker. Processes rather than threads: pydicom's parsing holds the GIL, so threads would
    serialize the decode. Same results, order and rejections as :func:`detect_folder`; at most
    ``2 x workers`` series are queued and ``workers`` decoded at once. The pool lives until
    :meth:`close` (or the ``with`` block ends), so repeated :meth:`detect` calls do not pay the
    start-up (about a second per worker).
    """

    def __init__(self, model_path, workers: int, intra_op_threads: int = 1, batch_size: int = 4,
                 min_slices: int = 3):
        import multiprocessing

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        # spawn, not fork: a forked ONNX Runtime or OpenCV thread pool is not safe to use
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(str(model_path), intra_op_threads, batch_size, min_slices))

    def detect(self, root, on_series: Optional[Callable[[SeriesResult], None]] = None,
               record: Optional[Callable[[str, float], None]] = None) -> DetectionRun:
        """As :func:`detect_folder`; ``record`` is called in this process once each series is back."""
        files = [str(p) for p in iter_files(check_folder(root))]
        size = max(1, min(64, -(-len(files) // (4 * self.workers))))
        scans = []
        chunks = [files[i:i + size] for i in range(0, len(files), size)]
        for chunk_scans, seconds in self._pool.map(_scan_chunk, chunks):
            scans += chunk_scans
            if record is not None:
                for s in seconds:
                    record("scan", s)
        groups, rejected = group_scanned(scans)
        return _collect(rejected, _bounded_map(self._pool, _detect_in_worker, groups, 2 * self.workers),
                        on_series, record)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ProcessPoolDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
