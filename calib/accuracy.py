"""How far an INT8 model is from its FP32 reference: output errors suited to heatmaps, findings, CPM.

Element-wise relative error is meaningless on a heatmap that is ~0 almost
everywhere, so per output we report absolute errors: mean, median, 99th
percentile and max over all cells, and max over the *peak cells* -- cells that
are local maxima (``nms_kernel`` neighbourhood) of the reference heatmap at or
above the decode threshold, where the decoder actually reads heatmap, size and
offset. Outputs come from polygraphy's :class:`~polygraphy.comparator.Comparator`
(ONNX Runtime runners, and a TensorRT runner where TensorRT exists), whose own
``SimpleCompareFunc(check_error_stat="mean")`` verdict is reported alongside.

Detection level: the same series through :class:`edge.detector.SeriesDetector`
with each model; findings of the two runs are matched greedily by 3-D distance
within ``tolerance_mm``.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

HEATMAP = "heatmap"
# Mean-absolute-error limits per output for polygraphy's verdict, in each output's units: heatmap
# score, size in input pixels (0.1 px = 0.15 mm at 1.5 mm pixels), offset in output cells.
MEAN_ATOL = {"heatmap": 1e-2, "size": 1e-1, "offset": 2e-2}


@dataclass(frozen=True)
class OutputError:
    name: str
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_abs: float
    peak_max_abs: float  # over peak cells of the reference heatmap (nan when there is none)
    peak_mean_abs: float
    peak_cells: int
    reference_max_abs: float

    def format(self) -> str:
        return (f"{self.name}: mean {self.mean_abs:.2e}, median {self.median_abs:.2e}, p99 {self.p99_abs:.2e}, "
                f"max {self.max_abs:.2e}; at {self.peak_cells} peak cell(s) max {self.peak_max_abs:.2e} "
                f"mean {self.peak_mean_abs:.2e} (|ref| max {self.reference_max_abs:.3g})")


def peak_mask(heatmap: np.ndarray, threshold: float, nms_kernel: int = 3) -> np.ndarray:
    """Boolean (N, 1, H, W): local maxima of ``heatmap`` (N, 1, H, W) at or above ``threshold``."""
    import cv2

    kernel = np.ones((nms_kernel, nms_kernel), np.uint8)
    hm = np.asarray(heatmap, np.float32)
    out = np.zeros(hm.shape, bool)
    for n in range(hm.shape[0]):
        plane = hm[n, 0]
        out[n, 0] = (plane >= cv2.dilate(plane, kernel)) & (plane >= threshold)
    return out


class ErrorAccumulator:
    """Collects per-output absolute errors over many inputs (kept as float32 arrays; fine for a few hundred slices)."""

    def __init__(self, peak_threshold: float, nms_kernel: int = 3):
        self.peak_threshold = peak_threshold
        self.nms_kernel = nms_kernel
        self.errors: Dict[str, List[np.ndarray]] = {}
        self.peak_errors: Dict[str, List[np.ndarray]] = {}
        self.reference_max: Dict[str, float] = {}

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        peaks = None
        if HEATMAP in reference:
            peaks = peak_mask(reference[HEATMAP], self.peak_threshold, self.nms_kernel)
        for name, ref in reference.items():
            ref = np.asarray(ref, np.float32)
            err = np.abs(np.asarray(candidate[name], np.float32) - ref)
            self.errors.setdefault(name, []).append(err.ravel())
            self.reference_max[name] = max(self.reference_max.get(name, 0.0), float(np.max(np.abs(ref))))
            if peaks is not None and err.shape[0] == peaks.shape[0] and err.shape[2:] == peaks.shape[2:]:
                mask = np.broadcast_to(peaks, err.shape)
                self.peak_errors.setdefault(name, []).append(err[mask])

    def result(self) -> Dict[str, OutputError]:
        out = {}
        for name, parts in self.errors.items():
            e = np.concatenate(parts)
            pk = np.concatenate(self.peak_errors.get(name, [np.zeros(0, np.float32)]))
            out[name] = OutputError(
                name, float(e.mean()), float(np.median(e)), float(np.quantile(e, 0.99)), float(e.max()),
                float(pk.max()) if pk.size else math.nan, float(pk.mean()) if pk.size else math.nan,
                int(pk.size), self.reference_max[name])
        return out


@dataclass
class RunnerComparison:
    reference: str
    candidate: str
    errors: Dict[str, OutputError]
    polygraphy_passed: bool
    iterations: int

    def format(self) -> str:
        verdict = "passed" if self.polygraphy_passed else "FAILED"
        lines = [f"{self.candidate} vs {self.reference} over {self.iterations} input(s) "
                 f"(polygraphy mean-error check {verdict}; limits "
                 + ", ".join(f"{k} {v:g}" for k, v in MEAN_ATOL.items()) + "):"]
        return "\n".join(lines + [f"  {e.format()}" for e in self.errors.values()])


def onnxrt_runner(path, name: str, qdq_as_written: bool = False):
    """polygraphy's ONNX Runtime runner (CPU); ``qdq_as_written``: see :class:`OnnxRuntimeRunner`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from edge.backends.onnxruntime_runner import create_session

    return OnnxrtRunner(lambda: create_session(str(path), path, graph_optimizations=not qdq_as_written), name=name)


def trt_runner(engine_path, name: str):
    """polygraphy's TensorRT runner over a serialized engine (needs tensorrt)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=name)


def compare_runners(runners: Sequence, feeds: Iterable[Dict[str, np.ndarray]], peak_threshold: float,
                    nms_kernel: int = 3) -> List[RunnerComparison]:
    """Run every runner on the same feeds with polygraphy's Comparator; compare each to the first."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    try:
        from polygraphy.comparator import SimpleCompareFunc  # polygraphy >= 0.53
    except ImportError:
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple
    feeds = list(feeds)
    compare = SimpleCompareFunc(atol=dict(MEAN_ATOL), rtol=0.0, check_error_stat="mean")
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(list(runners), data_loader=feeds)
        verdicts = [bool(Comparator.compare_accuracy(results, comparisons=[(0, i)], compare_func=compare))
                    for i in range(1, len(results))]
    (ref_name, ref_iters), *others = list(results.items())
    out = []
    for (name, iters), passed in zip(others, verdicts):
        acc = ErrorAccumulator(peak_threshold, nms_kernel)
        for ref_it, cand_it in zip(ref_iters, iters):
            acc.add({k: np.asarray(v) for k, v in ref_it.items()}, {k: np.asarray(v) for k, v in cand_it.items()})
        out.append(RunnerComparison(ref_name, name, acc.result(), passed, len(iters)))
    return out


# --------------------------------------------------------------------------- findings


@dataclass
class FindingAgreement:
    tolerance_mm: float
    reference: int
    candidate: int
    matched: int
    max_distance_mm: float
    max_probability_diff: float
    reference_only: List[Tuple[float, float, float, float]] = field(default_factory=list)  # x, y, z, probability
    candidate_only: List[Tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.matched == self.reference == self.candidate

    def format(self) -> str:
        return (f"findings within {self.tolerance_mm:g} mm: {self.matched} matched of {self.reference} (FP32) / "
                f"{self.candidate} (INT8); max distance {self.max_distance_mm:.3f} mm, max |dprob| "
                f"{self.max_probability_diff:.4f}; FP32 only {len(self.reference_only)}, INT8 only "
                f"{len(self.candidate_only)}")


def match_findings(reference: Sequence, candidate: Sequence, tolerance_mm: float = 1.0) -> FindingAgreement:
    """Greedy one-to-one matching of two finding lists by 3-D distance (closest pairs first)."""
    ref = np.array([[f.x, f.y, f.z] for f in reference], float).reshape(-1, 3)
    cand = np.array([[f.x, f.y, f.z] for f in candidate], float).reshape(-1, 3)
    pairs = []
    if len(ref) and len(cand):
        d = np.linalg.norm(ref[:, None, :] - cand[None, :, :], axis=-1)
        pairs = sorted((float(d[i, j]), i, j) for i, j in zip(*np.nonzero(d <= tolerance_mm)))
    used_r, used_c, matched = set(), set(), []
    for dist, i, j in pairs:
        if i in used_r or j in used_c:
            continue
        used_r.add(i)
        used_c.add(j)
        matched.append((dist, i, j))
    dprob = [abs(reference[i].probability - candidate[j].probability) for _, i, j in matched]
    as_tuple = lambda f: (f.x, f.y, f.z, f.probability)  # noqa: E731
    return FindingAgreement(
        tolerance_mm, len(ref), len(cand), len(matched),
        max((m[0] for m in matched), default=0.0), max(dprob, default=0.0),
        [as_tuple(reference[i]) for i in range(len(ref)) if i not in used_r],
        [as_tuple(candidate[j]) for j in range(len(cand)) if j not in used_c])


def detect_with_model(model_path, frames, qdq_as_written: bool = False) -> list:
    """Findings of one series with an ONNX model through the runtime's detector (ONNX Runtime, CPU)."""
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
    from edge.detector import SeriesDetector
    from edge.model_file import read_model_specs

    specs = read_model_specs(model_path)
    with OnnxRuntimeRunner(model_path, qdq_as_written=qdq_as_written) as runner:
        return SeriesDetector(runner, specs).detect(frames)


# --------------------------------------------------------------------------- CPM


def cpm_of_model(model_path, data_dir, annotations_path, qdq_as_written: bool = False) -> Tuple[float, int]:
    """(CPM, number of scans) of an ONNX model on a folder of annotated series (LUNA16 rules)."""
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
    from edge.model_file import read_model_specs
    from edge.offline import detect_folder
    from toolchain.evaluation.froc import Candidates, evaluate_froc
    from toolchain.evaluation.io import read_annotations

    specs = read_model_specs(model_path)
    with OnnxRuntimeRunner(model_path, qdq_as_written=qdq_as_written) as runner:
        run = detect_folder(data_dir, runner, specs)
    uids, centres, probs = [], [], []
    for s in run.series:
        for f in s.findings:
            uids.append(s.series_uid)
            centres.append((f.x, f.y, f.z))
            probs.append(f.probability)
    candidates = Candidates(tuple(uids), np.array(centres, float).reshape(-1, 3), np.array(probs, float))
    scans = [s.series_uid for s in run.series]
    result = evaluate_froc(read_annotations(annotations_path), candidates, scans)
    return result.cpm, len(scans)
