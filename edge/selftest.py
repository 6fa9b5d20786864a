"""``edge selftest``: exercise the whole CPU path on a small generated phantom, in seconds.

Phantom series -> DICOM files -> edge.dicom decode -> CPU preprocessing checked
against the float64 reference -> (if a model is installed) ONNX Runtime
inference and 3-D findings. Yields human-readable lines.
"""

import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from edge.errors import EdgeError


def run_selftest(model_path: Optional[Path] = None) -> Iterator[str]:
    from edge.detector import order_slices
    from edge.dicom.reader import read_frames
    from edge.phantom import generate_series, write_series
    from edge.preprocess.cpu import CpuPreprocessor
    from edge.preprocess.reference import preprocess_frame_reference
    from edge.preprocess.spec import PreprocessSpec

    t0 = time.perf_counter()
    series = generate_series(seed=7, profile="ge_standard", size=128, n_slices=12, n_nodules=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_series(series, tmp)
        frames = order_slices([f for p in paths for f in read_frames(p)])
    yield f"phantom: {len(frames)} slices of 128x128 written as DICOM and decoded ({time.perf_counter() - t0:.2f} s)"

    spec = PreprocessSpec(out_height=96, out_width=96, pixel_size_mm=2.5, slices=3)
    cpu = CpuPreprocessor(spec)
    err = max(float(np.max(np.abs(cpu.preprocess_frame(f) - preprocess_frame_reference(f, spec)))) for f in frames)
    if not err < 1e-4:
        raise EdgeError(f"selftest: CPU preprocessing differs from the reference by {err:.3g}")
    yield f"preprocess: CPU path matches the float64 reference (max abs error {err:.2e})"

    if model_path is None:
        from edge.cli import default_model_path

        try:
            model_path = default_model_path()
        except EdgeError:
            yield "model: none installed, inference skipped"
            return
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
    from edge.detector import SeriesDetector
    from edge.model_file import ModelSpecs

    with OnnxRuntimeRunner(model_path) as runner:
        specs = ModelSpecs.from_metadata(runner.custom_metadata(), source=model_path)
        findings = SeriesDetector(runner, specs).detect(frames)
    yield f"inference: {Path(model_path).name} ran on {len(frames)} slices, {len(findings)} finding(s)"
