"""One series of CT frames in, nodule findings out: preprocess -> infer -> decode -> 3-D.

The same code path serves offline detection (``edge detect``), the demo and the
streaming runtime. Each slice is preprocessed exactly once; its planes are reused
by the 2.5D stacks of its neighbours.
"""

import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from edge.backends.base import Runner
from edge.decode.findings import Finding
from edge.errors import InputError
from edge.frame import CTFrame
from edge.model_file import ModelSpecs


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
    """Detects nodules in one series with a runner and the model's specs.

    The offline face of :class:`edge.ingest.streaming.StreamingSeriesDetector`:
    the whole series is ordered first, then pushed slice by slice, so offline
    detection, the demo and the streaming runtime share one inference path.
    """

    def __init__(self, runner: Runner, specs: ModelSpecs, batch_size: int = 4, on_slice=None,
                 record: Optional[Callable[[str, float], None]] = None):
        self.runner = runner
        self.specs = specs
        self.batch_size = max(1, int(batch_size))
        self.on_slice = on_slice  # see StreamingSeriesDetector
        self.record = record  # also given every (stage, seconds) of timings
        self.timings: Dict[str, List[float]] = defaultdict(list)

    def _record(self, stage: str, seconds: float) -> None:
        self.timings[stage].append(seconds)
        if self.record is not None:
            self.record(stage, seconds)

    def detect(self, frames: Sequence[CTFrame]) -> List[Finding]:
        """All findings of a series (localizers are skipped)."""
        from edge.ingest.streaming import SliceOrderError, StreamingSeriesDetector

        frames = order_slices([f for f in frames if not f.is_localizer])
        stream = StreamingSeriesDetector(self.runner, self.specs, self.batch_size, record=self._record,
                                         on_slice=self.on_slice)
        findings: List[Finding] = []
        for f in frames:
            t0 = time.perf_counter()
            planes = stream.prepare(f)
            self._record("preprocess", time.perf_counter() - t0)
            try:
                findings += stream.push(planes, f.geometry)
            except SliceOrderError as e:  # e.g. two slices at the same position
                raise InputError(f.source, f"cannot be part of this series: {e}") from None
        return findings + stream.close()
