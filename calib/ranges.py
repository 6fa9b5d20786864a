"""Activation ranges (``amax``, symmetric) of every tensor an INT8 model may quantize.

Collection runs the FP32 ONNX model with ONNX Runtime, every float tensor exposed
as a graph output (graph optimizations off, so every tensor keeps its name and
its FP32 value), in two passes over the calibration inputs as TensorRT's
calibrator does: the first finds each tensor's largest ``|x|``, the second fills a
2048-bin histogram of ``|x|`` on ``[0, that max]``. Only the histograms are kept,
so memory does not grow with the calibration set; all four methods read them:

- ``max``: the largest ``|x|`` seen;
- ``percentile``: the ``percentile``-th percentile of ``|x|`` (upper edge of its bin);
- ``entropy``: TensorRT's entropy calibration (``IInt8EntropyCalibrator2``), the
  threshold minimising the KL divergence between the clipped reference
  distribution and its 128-level quantized version (:func:`entropy_threshold`);
- ``mse``: the threshold minimising the mean squared quantize-dequantize error.

The scale of a tensor is ``amax / 127`` (:func:`scale_from_amax`).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from edge.errors import ConfigError, InputError

METHODS = ("max", "percentile", "entropy", "mse")
# max, not percentile/entropy: a nodule peak is a handful of cells in a 128x128 map, so
# the head activations that carry it sit above the 99.99th percentile. Clipping them
# flattened every peak to one logit (phantom test split: CPM 0.471 FP32 -> 0.038 INT8
# with percentile, 0.471 with max; docs/int8.md).
DEFAULT_METHOD = "max"
DEFAULT_PERCENTILE = 99.99
HISTOGRAM_BINS = 2048
QUANTIZED_LEVELS = 128  # non-negative int8 levels of |x|, as TensorRT's entropy calibrator uses
INT8_MAX = 127.0
ZERO_RANGE_AMAX = 1.0  # a tensor that was zero on every input: any positive scale quantizes it exactly


@dataclass
class TensorHistogram:
    """Histogram of ``|x|`` of one tensor: ``counts[k]`` values in ``[k, k + 1) * bin_width``."""

    name: str
    counts: np.ndarray  # int64 (bins,)
    absmax: float  # largest |x| seen; the histogram covers [0, absmax]
    size: int  # values counted

    @property
    def bin_width(self) -> float:
        return self.absmax / len(self.counts) if self.absmax > 0 else 0.0


def scale_from_amax(amax: float) -> float:
    """Symmetric int8 scale: ``amax / 127``; a zero (or non-finite) range gets ``ZERO_RANGE_AMAX / 127``."""
    amax = float(amax)
    if not math.isfinite(amax) or amax <= 0.0:
        amax = ZERO_RANGE_AMAX
    return amax / INT8_MAX


# --------------------------------------------------------------------------- methods


def percentile_threshold(counts: np.ndarray, bin_width: float, percentile: float) -> float:
    """Upper edge of the bin holding the ``percentile``-th percentile of the counted values."""
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile!r}")
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0 or bin_width <= 0:
        return 0.0
    cdf = np.cumsum(counts) / total
    k = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12, side="left"))
    return float(min(k + 1, len(counts)) * bin_width)


def kl_divergence_curve(counts: np.ndarray, num_quantized_bins: int = QUANTIZED_LEVELS,
                        start: Optional[int] = None) -> np.ndarray:
    """``d[i]`` = KL(P_i || Q_i) for clipping after the first ``i`` bins, ``i = start .. len(counts)``.

    As described for TensorRT's entropy calibration (Migacz, "8-bit Inference
    with TensorRT", GTC 2017): P_i is the first ``i`` bins with the count of
    every later bin added to bin ``i - 1`` (the clipped outliers); Q_i quantizes
    the first ``i`` bins (without the outliers) into ``num_quantized_bins``
    levels of ``i // num_quantized_bins`` bins each (the last level also takes the
    remainder) and spreads each level's count evenly over those of its bins where
    P_i is non-zero (as MXNet's and ONNX Runtime's ports of the algorithm do).
    Both are normalized. ``inf`` where Q_i is zero on a bin where P_i is not
    (only outliers there: that threshold is never chosen). Entries below
    ``start`` (default ``num_quantized_bins``) are NaN.
    """
    counts = np.asarray(counts, np.float64)
    n = len(counts)
    nq = int(num_quantized_bins)
    start = nq if start is None else int(start)
    if nq < 1 or start < nq or start > n:
        raise ConfigError(f"need 1 <= num_quantized_bins <= start <= bins, got {nq}, {start}, {n}")
    outliers = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # outliers[i] = sum(counts[i:])
    curve = np.full(n + 1, np.nan)
    for i in range(start, n + 1):
        p = counts[:i].copy()
        p[i - 1] += outliers[i]
        p_total = p.sum()
        if p_total <= 0:
            curve[i] = 0.0
            continue
        nonzero = p != 0
        merged = i // nq
        starts = np.arange(nq) * merged
        level_sum = np.add.reduceat(counts[:i], starts)
        level_nonzero = np.add.reduceat(nonzero.astype(np.float64), starts)
        level = np.minimum(np.arange(i) // merged, nq - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.where(level_nonzero > 0, level_sum / level_nonzero, 0.0)
        q = np.where(nonzero, spread[level], 0.0)
        q_total = q.sum()
        if q_total <= 0:
            curve[i] = np.inf
            continue
        pn = p[nonzero] / p_total
        qn = q[nonzero] / q_total
        if np.any(qn == 0):
            curve[i] = np.inf
            continue
        curve[i] = float(np.sum(pn * np.log(pn / qn)))
    return curve


def entropy_threshold(counts: np.ndarray, bin_width: float, num_quantized_bins: int = QUANTIZED_LEVELS) -> float:
    """TensorRT's entropy threshold: ``(m + 0.5) * bin_width`` for the ``m`` minimising :func:`kl_divergence_curve`.

    With fewer bins than levels the whole histogram is kept (``len(counts) * bin_width``).
    """
    counts = np.asarray(counts)
    if bin_width <= 0 or counts.sum() <= 0:
        return 0.0
    if len(counts) <= num_quantized_bins:
        return float(len(counts) * bin_width)
    curve = kl_divergence_curve(counts, num_quantized_bins)
    valid = np.where(np.isnan(curve), np.inf, curve)
    m = int(np.argmin(valid))  # first minimum
    if not math.isfinite(valid[m]):
        return float(len(counts) * bin_width)
    return float(min((m + 0.5) * bin_width, len(counts) * bin_width))


def mse_threshold(counts: np.ndarray, bin_width: float, levels: float = INT8_MAX,
                  candidates: Optional[Sequence[int]] = None) -> float:
    """The ``amax`` among ``k * bin_width`` (``k`` in ``candidates``, default every bin edge) that minimises
    the expected squared error of symmetric quantize-dequantize, values taken at their bin centres."""
    counts = np.asarray(counts, np.float64)
    n = len(counts)
    if bin_width <= 0 or counts.sum() <= 0:
        return 0.0
    ks = np.arange(1, n + 1) if candidates is None else np.asarray(candidates, np.int64)
    centres = (np.arange(n) + 0.5) * bin_width
    used = counts > 0
    c, w = centres[used], counts[used]
    best_k, best_err = int(ks[-1]), math.inf
    for chunk in np.array_split(ks, max(1, len(ks) // 256)):
        step = (chunk[:, None] * bin_width) / levels  # (k, 1)
        q = np.minimum(np.rint(c[None, :] / step), levels) * step
        err = ((c[None, :] - q) ** 2 * w[None, :]).sum(axis=1)
        j = int(np.argmin(err))
        if err[j] < best_err:
            best_err, best_k = float(err[j]), int(chunk[j])
    return float(best_k * bin_width)


def amax_from_histogram(hist: TensorHistogram, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The symmetric range of one tensor by ``method`` (one of :data:`METHODS`)."""
    if method == "max":
        return float(hist.absmax)
    width = hist.bin_width
    if method == "percentile":
        return percentile_threshold(hist.counts, width, percentile)
    if method == "entropy":
        return entropy_threshold(hist.counts, width)
    if method == "mse":
        return mse_threshold(hist.counts, width)
    raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")


def head_tensors(model) -> List[str]:
    """The output heads' last activations, whose rare large values are the detections themselves.

    For each graph output: the activation input of the last Conv before it (through
    a final Sigmoid), and the Conv output its Relu reads (they share a scale). Any
    clipping method caps every nodule centre at about the same value there, so
    :func:`compute_ranges` keeps their full (``max``) range.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    names: List[str] = []
    for out in model.graph.output:
        node = producer.get(out.name)
        if node is not None and node.op_type == "Sigmoid":
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Conv":
            continue
        x = node.input[0]
        names.append(x)
        relu = producer.get(x)
        if relu is not None and relu.op_type == "Relu":
            names.append(relu.input[0])
    return list(dict.fromkeys(names))


def compute_ranges(histograms: Mapping[str, TensorHistogram], method: str,
                   percentile: float = DEFAULT_PERCENTILE, keep_max: Sequence[str] = ()) -> Dict[str, float]:
    """``{tensor: amax}`` for every histogram, by ``method``; tensors in ``keep_max`` always by ``max``."""
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    keep = set(keep_max)
    return {name: amax_from_histogram(h, "max" if name in keep else method, percentile)
            for name, h in histograms.items()}


# --------------------------------------------------------------------------- collection


def activation_tensors(model) -> List[str]:
    """Float tensors worth a range: the graph's float inputs and every float node output, in graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names += [o for o in node.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) == onnx.TensorProto.FLOAT]


class ActivationCollector:
    """Runs an FP32 ONNX model with ONNX Runtime and histograms ``|x|`` of its activations."""

    def __init__(self, model_path, tensors: Optional[Sequence[str]] = None, bins: int = HISTOGRAM_BINS,
                 intra_op_threads: int = 0):
        import onnx
        from google.protobuf.message import DecodeError

        from edge.backends.onnxruntime_runner import create_session

        self.model_path = Path(model_path)
        try:
            model = onnx.load(str(model_path))
        except (OSError, ValueError, DecodeError) as e:
            raise InputError(model_path, f"not a readable ONNX model: {e}") from None
        known = activation_tensors(model)
        if tensors is None:
            tensors = known
        missing = sorted(set(tensors) - set(known))
        if missing:
            raise InputError(model_path, f"model has no float activation tensor(s) {', '.join(missing[:5])}")
        self.tensors = list(tensors)
        self.bins = int(bins)
        outputs = {o.name for o in model.graph.output}
        for name in self.tensors:
            if name not in outputs:
                model.graph.output.add().name = name
        # optimizations off: fusion would hide the activations added as outputs above
        self.session = create_session(model.SerializeToString(), model_path, intra_op_threads=intra_op_threads,
                                      graph_optimizations=False)
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        return dict(zip(self.tensors, self.session.run(self.tensors, {self.input_name: batch})))

    def collect(self, batches: Callable[[], Iterable[np.ndarray]]) -> Dict[str, TensorHistogram]:
        """Two passes over ``batches()`` (a fresh iterable of (N, C, H, W) inputs each call)."""
        absmax = {name: 0.0 for name in self.tensors}
        n_batches = 0
        for batch in batches():
            n_batches += 1
            for name, value in self._run(batch).items():
                if value.size:
                    absmax[name] = max(absmax[name], float(np.max(np.abs(value))))
        if n_batches == 0:
            raise ConfigError("no calibration inputs: the calibration set is empty")
        counts = {name: np.zeros(self.bins, np.int64) for name in self.tensors}
        sizes = {name: 0 for name in self.tensors}
        for batch in batches():
            for name, value in self._run(batch).items():
                a = absmax[name]
                flat = np.abs(value.ravel())
                sizes[name] += flat.size
                if a <= 0:
                    counts[name][0] += flat.size
                    continue
                index = np.minimum((flat * (self.bins / a)).astype(np.int64), self.bins - 1)
                counts[name] += np.bincount(index, minlength=self.bins)
        return {name: TensorHistogram(name, counts[name], absmax[name], sizes[name]) for name in self.tensors}


# --------------------------------------------------------------------------- files


def save_histograms(path, histograms: Mapping[str, TensorHistogram]) -> None:
    """Histograms as one ``.npz`` (sweeping methods needs no second collection)."""
    names = list(histograms)
    np.savez_compressed(
        path,
        names=np.array(names),
        counts=np.stack([histograms[n].counts for n in names]) if names else np.zeros((0, HISTOGRAM_BINS), np.int64),
        absmax=np.array([histograms[n].absmax for n in names], np.float64),
        sizes=np.array([histograms[n].size for n in names], np.int64),
    )


def load_histograms(path) -> Dict[str, TensorHistogram]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a histogram file: {e}") from None
    return {str(n): TensorHistogram(str(n), c.astype(np.int64), float(a), int(s))
            for n, c, a, s in zip(data["names"], data["counts"], data["absmax"], data["sizes"])}


def write_ranges(path, amax: Mapping[str, float], method: str, percentile: float = DEFAULT_PERCENTILE,
                 extra: Optional[dict] = None) -> None:
    doc = {"method": method, "amax": {k: float(v) for k, v in amax.items()}}
    if method == "percentile":
        doc["percentile"] = percentile
    doc.update(extra or {})
    Path(path).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_ranges(path) -> Dict[str, float]:
    """``{tensor: amax}`` from a file written by :func:`write_ranges`."""
    try:
        doc = json.loads(Path(path).read_text())
        return {str(k): float(v) for k, v in doc["amax"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(path, f"not a ranges file (JSON with an 'amax' table): {e}") from None
