"""Streaming detection over one series: slices in (in order along the normal), findings out as they complete.

:class:`StreamingSeriesDetector` is :class:`edge.detector.SeriesDetector`
turned inside out: slices are pushed one at a time, each already preprocessed
once; a slice is inferred as soon as its 2.5D neighbours (``slices // 2`` on
each side) have been pushed, in batches of ``batch_size`` (or fewer when the
caller asks, e.g. while its queue is empty); each inferred slice goes straight
into the streaming :class:`~edge.decode.findings.SeriesFindingAggregator`, so a
finding is returned by the push that completes it. Only the neighbour window of
planes is kept. :meth:`close` is the end of the series: the last slices get
their neighbours clamped, as in the offline detector, and the remaining
findings are flushed. Fed the same slices, the results equal
``SeriesDetector.detect``.

Slices must be pushed sorted by position along the slice normal (either
direction); putting out-of-order arrivals in order is the job of
:mod:`edge.ingest.assembly`. :meth:`check_sequence` tells, without side
effects, whether slices may follow the ones pushed so far.
"""

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from edge.backends.base import Runner
from edge.decode.findings import Finding, SeriesFindingAggregator
from edge.decode.peaks import detections_to_patient, extract_peaks_batch
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.model_file import ModelSpecs
from edge.preprocess.cpu import CpuPreprocessor

# Same tolerances as edge.detector.order_slices and the aggregator.
_PARALLEL_COS = 0.999
_SAME_LOCATION_MM = 1e-3


class SliceOrderError(ValueError):
    """A slice cannot follow the ones already pushed.

    ``kind`` is ``"geometry"`` (other size or orientation than the series: the
    slice does not belong to this volume) or ``"order"`` (right volume, wrong
    place: out of order along the normal, or a location seen before).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class StreamingSeriesDetector:
    """Incremental detection over one series; see the module docstring.

    ``record(stage, seconds)`` receives per-slice timings: ``infer`` (the batch's
    inference time divided by its size), ``postprocess`` (peaks, patient mapping,
    3-D aggregation) and ``slice_latency`` (receipt to inferred, for slices pushed
    with ``received_at``, a :func:`time.perf_counter` value). ``on_slice(geometry,
    detections)`` receives each inferred slice's 2-D detections (patient mm), in order.
    """

    def __init__(self, runner: Runner, specs: ModelSpecs, batch_size: int = 4,
                 record: Optional[Callable[[str, float], None]] = None,
                 on_slice: Optional[Callable[[SliceGeometry, list], None]] = None):
        self.runner = runner
        self.specs = specs
        self.batch_size = max(1, int(batch_size))
        self.record = record
        self.on_slice = on_slice
        spec = specs.preprocess
        meta = next(iter(runner.input_metadata().values()))
        self.input_name = meta.name
        self.input_dtype = np.dtype(meta.dtype)
        self.plane_shape = (len(spec.windows), spec.out_height, spec.out_width)
        self.half = spec.slices // 2
        self.aggregator = SeriesFindingAggregator(specs.decode)
        self._preprocessor: Optional[CpuPreprocessor] = None
        self._planes: Dict[int, np.ndarray] = {}
        self._geometry: Dict[int, SliceGeometry] = {}
        self._received: Dict[int, Optional[float]] = {}
        self._pushed = 0
        self._next_infer = 0
        self._closed = False
        self._reference: Optional[SliceGeometry] = None
        self._last_location: Optional[float] = None
        self._direction = 0

    # --- input

    @property
    def n_pushed(self) -> int:
        return self._pushed

    @property
    def n_inferred(self) -> int:
        return self._next_infer

    @property
    def n_ready(self) -> int:
        """Slices whose neighbours are known and that wait for inference."""
        last_ready = self._pushed if self._closed else self._pushed - self.half
        return max(0, last_ready - self._next_infer)

    def new_planes(self) -> np.ndarray:
        """An empty (n_windows, H, W) plane buffer in the model's input dtype, to preprocess into."""
        return np.empty(self.plane_shape, self.input_dtype)

    def prepare(self, frame: CTFrame) -> np.ndarray:
        """Preprocess one frame with this detector's own CPU preprocessor (single-threaded use)."""
        if self._preprocessor is None:
            self._preprocessor = CpuPreprocessor(self.specs.preprocess)
        return self._preprocessor.preprocess_frame(frame, out=self.new_planes())

    def check_sequence(self, geometries: Sequence[SliceGeometry]) -> None:
        """Raise :class:`SliceOrderError` unless these slices, in this order, may be pushed next."""
        reference = self._reference
        last, direction = self._last_location, self._direction
        for g in geometries:
            if reference is None:
                reference = g
            else:
                if (g.rows, g.columns) != (reference.rows, reference.columns):
                    raise SliceOrderError(
                        "geometry", f"frame size {g.rows}x{g.columns} differs from the series' {reference.rows}x{reference.columns}"
                    )
                if float(np.dot(g.normal, reference.normal)) < _PARALLEL_COS:
                    raise SliceOrderError("geometry", "slice orientation differs from the rest of the series")
            loc = g.slice_location
            if last is not None:
                delta = loc - last
                if abs(delta) < _SAME_LOCATION_MM:
                    raise SliceOrderError("order", f"a slice at location {loc:.3f} mm was already pushed")
                step = 1 if delta > 0 else -1
                if direction and step != direction:
                    raise SliceOrderError("order", f"slice at {loc:.3f} mm is out of order after {last:.3f} mm")
                direction = step
            last = loc

    def push(self, planes: np.ndarray, geometry: SliceGeometry, received_at: Optional[float] = None) -> List[Finding]:
        """Add the next slice (its preprocessed planes); returns the findings completed by the
        inference this made possible (full batches only: see :meth:`run_ready`)."""
        if self._closed:
            raise RuntimeError("push after close: the series is closed")
        if planes.shape != self.plane_shape:
            raise ValueError(f"planes must have shape {self.plane_shape}, got {planes.shape}")
        self.check_sequence([geometry])
        if self._reference is None:
            self._reference = geometry
        loc = geometry.slice_location
        if self._last_location is not None:
            self._direction = 1 if loc > self._last_location else -1
        self._last_location = loc
        i = self._pushed
        self._planes[i] = planes
        self._geometry[i] = geometry
        self._received[i] = received_at
        self._pushed += 1
        findings: List[Finding] = []
        while self.n_ready >= self.batch_size:
            findings += self._infer(self.batch_size)
        return findings

    def push_frame(self, frame: CTFrame, received_at: Optional[float] = None) -> List[Finding]:
        """:meth:`prepare` then :meth:`push`."""
        return self.push(self.prepare(frame), frame.geometry, received_at)

    def run_ready(self) -> List[Finding]:
        """Infer every slice that is ready now, the last batch possibly partial."""
        findings: List[Finding] = []
        while self.n_ready:
            findings += self._infer(min(self.batch_size, self.n_ready))
        return findings

    def close(self) -> List[Finding]:
        """End of series: infer the rest (end neighbours clamped) and flush the aggregator."""
        if self._closed:
            return []
        self._closed = True
        findings = self.run_ready()
        findings += self.aggregator.flush()
        self._planes.clear()
        return findings

    # --- inference

    def _infer(self, n: int) -> List[Finding]:
        spec = self.specs.preprocess
        n_windows = len(spec.windows)
        last = self._pushed - 1
        idx = range(self._next_infer, self._next_infer + n)
        batch = np.empty((n, spec.channels, spec.out_height, spec.out_width), self.input_dtype)
        for b, i in enumerate(idx):
            for s in range(spec.slices):
                j = min(max(i + s - self.half, 0), last)
                batch[b, s * n_windows:(s + 1) * n_windows] = self._planes[j]
        t0 = time.perf_counter()
        out = self.runner.infer({self.input_name: batch})
        t1 = time.perf_counter()
        peaks = extract_peaks_batch(out["heatmap"], out["size"], out["offset"], self.specs.decode)
        findings: List[Finding] = []
        for i, p in zip(idx, peaks):
            g = self._geometry[i]
            resample = spec.resample_geometry(g.rows, g.columns, g.pixel_spacing)
            detections = detections_to_patient(p, resample, g)
            if self.on_slice is not None:
                self.on_slice(g, detections)
            findings += self.aggregator.add_slice(g.slice_location, detections)
        t2 = time.perf_counter()
        self._next_infer += n
        if self.record is not None:
            for i in idx:
                self.record("infer", (t1 - t0) / n)
                self.record("postprocess", (t2 - t1) / n)
                if self._received[i] is not None:
                    self.record("slice_latency", t2 - self._received[i])
        self._evict()
        return findings

    def _evict(self) -> None:
        """Drop planes no longer needed as a neighbour of a slice still to infer."""
        keep_from = self._next_infer - self.half
        for i in [i for i in self._planes if i < keep_from]:
            del self._planes[i]
            del self._geometry[i]
            del self._received[i]
