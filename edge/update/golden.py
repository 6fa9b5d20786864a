"""Golden vectors: network inputs with the outputs and per-slice findings a model must give for them.

A bundle ships ``golden.npz``, made on the workstation by running the bundled
model (ONNX Runtime, CPU) on preprocessed slices of a phantom series. On the
device the prepared model (a fresh TensorRT engine, or ONNX Runtime) runs the
same inputs and must match within the manifest's :class:`GoldenSpec`:

* heatmap: max abs difference <= ``heatmap_atol``;
* findings: peaks decoded with the model's own decode spec must match both
  ways (same place within ``position_px`` model-input pixels, score within
  ``score_atol``, diameter within ``diameter_rel`` x max(diameter, 1 px)).
  Peaks within ``score_atol`` of the score threshold (or of the lowest kept
  score when ``max_detections_per_slice`` cut the list) may come and go.

``golden.npz`` arrays: ``input`` (N, C, H, W) float32; ``heatmap``, ``size``
(N, 1, h, w) and ``offset`` (N, 2, h, w) float32; ``peaks`` (all slices'
peaks, :data:`edge.decode.peaks.PEAK_DTYPE`) and ``peak_count`` (N,) int64.
"""

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from edge.backends.base import Runner
from edge.decode.peaks import PEAK_DTYPE, extract_peaks_batch
from edge.decode.spec import DecodeSpec
from edge.errors import InputError
from edge.preprocess.spec import PreprocessSpec
from edge.update.errors import GoldenCheckError
from edge.update.manifest import GoldenSpec

OUTPUTS = ("heatmap", "size", "offset")
_MIN_DIAMETER_SCALE_PX = 1.0


@dataclass
class GoldenVectors:
    inputs: np.ndarray
    outputs: Dict[str, np.ndarray]
    peaks: List[np.ndarray]  # one PEAK_DTYPE array per input

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            input=self.inputs,
            peaks=np.concatenate(self.peaks) if self.peaks else np.empty(0, PEAK_DTYPE),
            peak_count=np.array([len(p) for p in self.peaks], np.int64),
            **self.outputs,
        )
        return buf.getvalue()

    def save(self, path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path) -> "GoldenVectors":
        """Read ``golden.npz``; InputError naming the file for anything malformed."""
        try:
            with np.load(str(path), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise InputError(path, f"golden vectors are not a readable .npz: {type(e).__name__}: {e}") from None
        missing = sorted({"input", "peaks", "peak_count", *OUTPUTS} - set(arrays))
        if missing:
            raise InputError(path, f"golden vectors lack array(s) {', '.join(missing)}")
        x = arrays["input"]
        if x.ndim != 4 or x.shape[0] < 1 or x.dtype != np.float32:
            raise InputError(path, f"golden 'input' must be float32 (N, C, H, W), got {x.dtype} {x.shape}")
        n = x.shape[0]
        for name, channels in zip(OUTPUTS, (1, 1, 2)):
            a = arrays[name]
            if a.ndim != 4 or a.shape[:2] != (n, channels) or a.dtype != np.float32:
                raise InputError(path, f"golden {name!r} must be float32 ({n}, {channels}, h, w), got {a.dtype} {a.shape}")
        counts = arrays["peak_count"]
        peaks = arrays["peaks"]
        if counts.shape != (n,) or counts.dtype.kind not in "iu" or (counts < 0).any() or int(counts.sum()) != len(peaks):
            raise InputError(path, "golden 'peak_count' does not match 'peaks'")
        if peaks.dtype != PEAK_DTYPE:
            raise InputError(path, f"golden 'peaks' must have dtype {PEAK_DTYPE}, got {peaks.dtype}")
        split = np.split(peaks, np.cumsum(counts)[:-1]) if n > 1 else [peaks]
        return cls(x, {k: arrays[k] for k in OUTPUTS}, [np.asarray(p) for p in split])


def run_model(runner: Runner, inputs: np.ndarray) -> Dict[str, np.ndarray]:
    """All outputs for ``inputs``, one input at a time (any engine profile takes batch 1), as float32."""
    meta = next(iter(runner.input_metadata().values()))
    outs: Dict[str, List[np.ndarray]] = {k: [] for k in OUTPUTS}
    for i in range(inputs.shape[0]):
        got = runner.infer({meta.name: np.ascontiguousarray(inputs[i : i + 1], dtype=meta.dtype)})
        missing = [k for k in OUTPUTS if k not in got]
        if missing:
            raise InputError(None, f"model has no output(s) {', '.join(missing)}")
        for k in OUTPUTS:
            outs[k].append(np.asarray(got[k], np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def make_golden(runner: Runner, decode: DecodeSpec, inputs: np.ndarray) -> GoldenVectors:
    """Golden vectors from an active reference runner (ONNX Runtime on the workstation)."""
    inputs = np.ascontiguousarray(inputs, np.float32)
    outputs = run_model(runner, inputs)
    peaks = extract_peaks_batch(outputs["heatmap"], outputs["size"], outputs["offset"], decode)
    return GoldenVectors(inputs, outputs, peaks)


def phantom_inputs(spec: PreprocessSpec, count: int = 4, seed: int = 0, size: int = 192) -> np.ndarray:
    """``count`` network inputs from a phantom chest series: slices through its nodules first, then evenly spaced."""
    from edge.detector import order_slices
    from edge.phantom.series import generate_series
    from edge.preprocess.cpu import CpuPreprocessor, iter_network_inputs

    n_slices = max(3 * count, spec.slices + 2)
    series = generate_series(seed, size=size, n_slices=n_slices, n_nodules=min(count, 4))
    frames = order_slices(series.frames())
    locations = np.array([f.geometry.slice_location for f in frames])
    chosen: List[int] = []
    for nodule in series.nodules:
        i = int(np.argmin(np.abs(locations - nodule.center[2])))
        if i not in chosen:
            chosen.append(i)
    for i in np.linspace(0, len(frames) - 1, count).round().astype(int):
        if len(chosen) < count and int(i) not in chosen:
            chosen.append(int(i))
    chosen = sorted(chosen[:count])
    inputs = [x.copy() for i, x in enumerate(iter_network_inputs(frames, CpuPreprocessor(spec))) if i in chosen]
    return np.concatenate(inputs).astype(np.float32)


@dataclass
class GoldenReport:
    """How a prepared model did on the golden vectors."""

    inputs: int
    heatmap_max_abs_diff: float
    peaks_required: int
    peaks_matched: int
    problems: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = (f"golden check on {self.inputs} input(s): heatmap max abs diff {self.heatmap_max_abs_diff:.3g}, "
                f"{self.peaks_matched}/{self.peaks_required} required finding(s) matched")
        if self.passed:
            return head
        more = f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return f"{head}; " + "; ".join(self.problems[:3]) + more


def _required(peaks: np.ndarray, decode: DecodeSpec, tol: GoldenSpec) -> np.ndarray:
    floor = decode.score_threshold + tol.score_atol
    if len(peaks) >= decode.max_detections_per_slice:
        floor = max(floor, float(peaks["score"].min()) + tol.score_atol)
    return peaks[peaks["score"] >= floor]


def _has_match(p, candidates: np.ndarray, tol: GoldenSpec) -> bool:
    if len(candidates) == 0:
        return False
    dist = np.hypot(candidates["row"] - p["row"], candidates["col"] - p["col"])
    dscore = np.abs(candidates["score"] - p["score"])
    ddiam = np.abs(candidates["diameter"] - p["diameter"])
    scale = np.maximum(np.abs(p["diameter"]), _MIN_DIAMETER_SCALE_PX)
    return bool(np.any((dist <= tol.position_px) & (dscore <= tol.score_atol) & (ddiam <= tol.diameter_rel * scale)))


def compare_golden(outputs: Dict[str, np.ndarray], golden: GoldenVectors, decode: DecodeSpec,
                   tol: GoldenSpec) -> GoldenReport:
    """Compare a model's outputs on ``golden.inputs`` with the golden outputs and findings."""
    problems: List[str] = []
    for k in OUTPUTS:
        if outputs[k].shape != golden.outputs[k].shape:
            problems.append(f"output {k!r} has shape {outputs[k].shape}, golden {golden.outputs[k].shape}")
    if problems:
        return GoldenReport(len(golden), float("nan"), 0, 0, problems)
    diff = np.abs(outputs["heatmap"] - golden.outputs["heatmap"])
    worst = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
    if not worst <= tol.heatmap_atol:
        problems.append(f"heatmap max abs diff {worst:.3g} > {tol.heatmap_atol:g}")
    got = extract_peaks_batch(outputs["heatmap"], outputs["size"], outputs["offset"], decode)
    required = matched = 0
    for i, (want, have) in enumerate(zip(golden.peaks, got)):
        for p in _required(want, decode, tol):
            required += 1
            if _has_match(p, have, tol):
                matched += 1
            else:
                problems.append(f"input {i}: finding at ({p['row']:.1f}, {p['col']:.1f}) score {p['score']:.3f} "
                                "missing or off")
        for p in _required(have, decode, tol):
            if not _has_match(p, want, tol):
                problems.append(f"input {i}: unexpected finding at ({p['row']:.1f}, {p['col']:.1f}) "
                                f"score {p['score']:.3f}")
    return GoldenReport(len(golden), worst, required, matched, problems)


def check_golden(open_runner: Callable[[], Runner], golden: GoldenVectors, decode: DecodeSpec,
                 tol: GoldenSpec, source: Optional[str] = None) -> GoldenReport:
    """Run the golden inputs through a fresh runner; GoldenCheckError if anything is out of tolerance."""
    runner = open_runner()
    with runner:
        outputs = run_model(runner, golden.inputs)
    report = compare_golden(outputs, golden, decode, tol)
    if not report.passed:
        where = f"{source}: " if source else ""
        raise GoldenCheckError(f"{where}{report.format()}")
    return report
