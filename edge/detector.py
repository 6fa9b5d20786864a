"""One series of CT frames in, nodule findings out: preprocess -> infer -> decode -> 3-D.

The same code path serves offline detection (``edge detect``), the demo and the
streaming runtime. Each slice is preprocessed exactly once; its planes are reused
by the 2.5D stacks of its neighbours.
"""

import time
from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np

from edge.backends.base import Runner
from edge.decode.findings import Finding, SeriesFindingAggregator
from edge.decode.peaks import detections_to_patient, extract_peaks_batch
from edge.errors import InputError
from edge.frame import CTFrame
from edge.model_file import ModelSpecs
from edge.preprocess.cpu import CpuPreprocessor

OUTPUTS = ("heatmap", "size", "offset")


def order_slices(frames: Sequence[CTFrame]) -> List[CTFrame]:
    """Sort frames by position along the slice normal; raise InputError for frames that cannot form one volume."""
    if not frames:
        return []
    ref = frames[0].geometry
    for f in frames[1:]:
        g = f.geometry
        if (g.rows, g.columns) != (ref.rows, ref.columns):
            raise InputError(f.source, f"frame size {g.rows}x{g.columns} differs from the series' {ref.rows}x{ref.columns}")
        if float(np.dot(g.normal, ref.normal)) < 0.999:
            raise InputError(f.source, "slice orientation differs from the rest of the series")
    return sorted(frames, key=lambda f: f.geometry.slice_location)


class SeriesDetector:
    """Detects nodules in one ordered series with a runner and the model's specs."""

    def __init__(self, runner: Runner, specs: ModelSpecs, batch_size: int = 4):
        self.runner = runner
        self.specs = specs
        self.batch_size = max(1, int(batch_size))
        self.preprocessor = CpuPreprocessor(specs.preprocess)
        meta = next(iter(runner.input_metadata().values()))
        self.input_name = meta.name
        self.input_dtype = meta.dtype  # the engine's binding type, whatever spec.dtype says
        self.timings: Dict[str, List[float]] = defaultdict(list)

    def detect(self, frames: Sequence[CTFrame]) -> List[Finding]:
        """All findings of a series (localizers are skipped)."""
        frames = order_slices([f for f in frames if not f.is_localizer])
        if not frames:
            return []
        spec = self.specs.preprocess
        t0 = time.perf_counter()
        planes = [self.preprocessor.preprocess_frame(f) for f in frames]
        self.timings["preprocess"].append((time.perf_counter() - t0) / len(frames))
        aggregator = SeriesFindingAggregator(self.specs.decode)
        findings: List[Finding] = []
        half = spec.slices // 2
        for start in range(0, len(frames), self.batch_size):
            idx = range(start, min(start + self.batch_size, len(frames)))
            batch = np.empty((len(idx), spec.channels, spec.out_height, spec.out_width), self.input_dtype)
            for b, i in enumerate(idx):
                for s in range(spec.slices):
                    j = min(max(i + s - half, 0), len(frames) - 1)
                    batch[b, s * len(spec.windows) : (s + 1) * len(spec.windows)] = planes[j]
            t1 = time.perf_counter()
            out = self.runner.infer({self.input_name: batch})
            t2 = time.perf_counter()
            peaks = extract_peaks_batch(out["heatmap"], out["size"], out["offset"], self.specs.decode)
            for i, p in zip(idx, peaks):
                g = frames[i].geometry
                resample = spec.resample_geometry(g.rows, g.columns, g.pixel_spacing)
                findings += aggregator.add_slice(g.slice_location, detections_to_patient(p, resample, g))
            t3 = time.perf_counter()
            self.timings["infer"].append((t2 - t1) / len(idx))
            self.timings["decode"].append((t3 - t2) / len(idx))
        findings += aggregator.flush()
        return findings
