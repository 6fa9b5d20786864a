"""Hard negatives: where a model scores high on training slices with no nodule, for crops centred there.

Random negative crops rarely land on the few structures that look like a nodule
on three slices (a vessel seen end-on, a bright spot at the lung's edge), yet
those decide the low-false-positive end of the FROC curve. Mining
runs a model over whole training slices (the cached, preprocessed planes the
sampler crops from), keeps its heatmap peaks at or above a score that lie away
from every annotated nodule, and writes them as a CSV keyed by series UID and
slice index; :class:`~toolchain.training.sampling.CropSampler` then centres a
share of its negative crops on them (``AugmentConfig.hard_negative_fraction``).
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from edge.decode.peaks import grid_to_input, local_maxima
from edge.errors import ConfigError, InputError
from toolchain.training.slice_cache import CachedSeries

DEFAULT_HARD_NEGATIVE_FRACTION = 0.5  # of the negative crops (tools/distill.py)
CSV_FIELDS = ("series_uid", "slice_index", "row", "col", "score")
NODULE_CLEARANCE = 1.0  # peaks closer than this many nodule diameters (+ a margin) are not negatives
NODULE_MARGIN_PX = 4.0
NODULE_SLICE_REACH = 2  # nodules annotated this many slices away still count (the 3-slice input shows them)


@dataclass(frozen=True)
class HardNegative:
    """A peak on a training slice with no nodule near it (row, col: model-input pixels of that slice)."""

    series_uid: str
    slice_index: int
    row: float
    col: float
    score: float


def slice_stack(series: CachedSeries, k: int, slices: int) -> np.ndarray:
    """The model input centred on slice ``k``: ``slices`` neighbours (edge slices repeated) x windows, float32."""
    half = slices // 2
    idx = [min(max(k + d, 0), len(series.planes) - 1) for d in range(-half, half + 1)]
    return series.planes[idx].reshape(-1, *series.planes.shape[-2:]).astype(np.float32)


def near_a_nodule(series: CachedSeries, k: int, row: float, col: float) -> bool:
    """Whether (row, col) on slice ``k`` is within reach of a nodule annotated on it or a nearby slice."""
    lo, hi = max(k - NODULE_SLICE_REACH, 0), min(k + NODULE_SLICE_REACH, len(series.nodules) - 1)
    for j in range(lo, hi + 1):
        for (r, c, d, _frac) in series.nodules[j]:
            if np.hypot(row - r, col - c) <= NODULE_CLEARANCE * d + NODULE_MARGIN_PX:
                return True
    return False


def series_peaks(heatmap: np.ndarray, offset: np.ndarray, stride: int, min_score: float,
                 kernel: int = 3) -> List[Tuple[float, float, float]]:
    """(score, row, col) of one slice's heatmap peaks at or above ``min_score``, best first (model-input px)."""
    mask = local_maxima(heatmap, kernel) & (heatmap >= min_score)
    i, j = np.nonzero(mask)
    if i.size == 0:
        return []
    rows, cols = grid_to_input(i, j, offset[0, i, j], offset[1, i, j], stride)
    scores = heatmap[i, j]
    order = np.argsort(-scores, kind="stable")
    return [(float(scores[n]), float(rows[n]), float(cols[n])) for n in order]


def mine_hard_negatives(model, series: Sequence[CachedSeries], slices: int, stride: int, min_score: float = 0.3,
                        max_per_series: int = 20, batch_size: int = 8, progress=None) -> List[HardNegative]:
    """The ``max_per_series`` best-scoring peaks >= ``min_score`` of ``model`` per series that miss every nodule.

    ``model`` is a detector module returning (heatmap logits, size, offset);
    it runs in eval mode without gradients on whole cached slices.
    """
    import torch

    if not 0.0 < min_score < 1.0:
        raise ValueError(f"min_score must be in (0, 1), got {min_score}")
    if max_per_series < 1:
        raise ValueError(f"max_per_series must be >= 1, got {max_per_series}")
    model.eval()
    found: List[HardNegative] = []
    for n, s in enumerate(series):
        peaks = []
        for start in range(0, len(s.planes), batch_size):
            ks = list(range(start, min(start + batch_size, len(s.planes))))
            x = torch.from_numpy(np.stack([slice_stack(s, k, slices) for k in ks]))
            with torch.no_grad():
                hm, _size, off = model(x)
            hm = torch.sigmoid(hm).numpy()[:, 0]
            off = off.numpy()
            for b, k in enumerate(ks):
                for score, row, col in series_peaks(hm[b], off[b], stride, min_score):
                    if not near_a_nodule(s, k, row, col):
                        peaks.append(HardNegative(s.series_uid, k, row, col, score))
        peaks.sort(key=lambda p: -p.score)
        found.extend(peaks[:max_per_series])
        if progress is not None:
            progress(n + 1, len(series), len(found))
    return found


def write_hard_negatives(path, negatives: Sequence[HardNegative]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for h in negatives:
            w.writerow([h.series_uid, h.slice_index, f"{h.row:.2f}", f"{h.col:.2f}", f"{h.score:.4f}"])


def check_hard_negative_settings(have_negatives: bool, fraction: float) -> None:
    """ConfigError for a hard-negative fraction outside [0, 1], or above 0 with no hard negatives given."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"hard-negative fraction must be in [0, 1], got {fraction}")
    if fraction > 0 and not have_negatives:
        raise ConfigError("a hard-negative fraction needs hard negatives (a CSV from tools/mine_hard_negatives.py)")


def read_hard_negatives(path) -> List[HardNegative]:
    """Rows of a :func:`write_hard_negatives` CSV; InputError naming the file and line when one is bad."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_FIELDS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(path, f"missing column(s) {', '.join(missing)} (expected {', '.join(CSV_FIELDS)})")
            out = []
            for line, row in enumerate(reader, start=2):
                try:
                    out.append(HardNegative(row["series_uid"], int(row["slice_index"]), float(row["row"]),
                                            float(row["col"]), float(row["score"])))
                except (TypeError, ValueError):
                    raise InputError(path, f"line {line}: slice_index must be an integer and row, col, score "
                                           "numbers") from None
    except OSError as e:
        raise InputError(path, f"cannot read hard negatives: {e.strerror or e}") from None
    return out


def index_hard_negatives(negatives: Sequence[HardNegative], series: Sequence[CachedSeries],
                         source="hard negatives") -> List[Tuple[int, int, float, float]]:
    """(series index, slice index, row, col) of the negatives that fall on ``series``.

    Rows of series not in ``series`` (e.g. mined on another dataset) are skipped;
    a slice index past its series' end is an InputError naming ``source``.
    """
    by_uid: Dict[str, int] = {s.series_uid: n for n, s in enumerate(series)}
    out = []
    for h in negatives:
        si = by_uid.get(h.series_uid)
        if si is None:
            continue
        if not 0 <= h.slice_index < len(series[si].planes):
            raise InputError(Path(str(source)), f"series {h.series_uid} has {len(series[si].planes)} slices, "
                                                f"a hard negative is on slice {h.slice_index} (mined on other data?)")
        out.append((si, h.slice_index, h.row, h.col))
    return out
