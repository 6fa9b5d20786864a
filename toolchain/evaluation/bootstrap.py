"""Bootstrap confidence intervals for the FROC curve and CPM, resampling scans.

As the official ``computeFROC_bootstrap``: each sample draws as many scans as
were evaluated, with replacement, pools the FROC entries (detected and missed
nodules, FPs) of the drawn scans, keeps the total number of scans as the
FP/scan divisor, and recomputes the FROC curve. Bounds are the official order
statistics of the sorted samples: ``vec[floor(a*n)]`` and ``vec[floor((1-a)*n)]``
with ``a = (1 - confidence) / 2``. Samples that draw no nodule at all have an
undefined sensitivity (NaN in the official script) and are left out; the
result says how many samples were used. A seeded ``numpy.random.Generator``
makes the result deterministic.
"""

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge.errors import ConfigError
from toolchain.evaluation.froc import FP_RATES, Matching, froc_curve

BAND_FP_RATES = np.geomspace(FP_RATES[0], FP_RATES[-1], 193)
"""FP/scan grid (log-spaced, contains the 7 operating points) for the plotted band."""


@dataclass(frozen=True)
class BootstrapResult:
    samples: int  # samples used (drew at least one nodule)
    requested: int
    confidence: float
    seed: int
    fp_rates: np.ndarray
    sensitivity_mean: np.ndarray  # at fp_rates
    sensitivity_lower: np.ndarray
    sensitivity_upper: np.ndarray
    cpm_mean: float
    cpm_lower: float
    cpm_upper: float
    band_fp_rates: np.ndarray
    band_mean: np.ndarray
    band_lower: np.ndarray
    band_upper: np.ndarray


def _order_statistic_bounds(values: np.ndarray, confidence: float):
    """Official ``compute_mean_ci`` along axis 0."""
    ordered = np.sort(values, axis=0)
    n = ordered.shape[0]
    tail = (1.0 - confidence) / 2.0
    return ordered.mean(axis=0), ordered[int(np.floor(tail * n))], ordered[int(np.floor((1.0 - tail) * n))]


def bootstrap_froc(
    matching: Matching,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    fp_rates: Sequence[float] = FP_RATES,
) -> BootstrapResult:
    """Bootstrap CIs of the sensitivities at ``fp_rates``, of the CPM and of the curve."""
    if samples < 1:
        raise ConfigError(f"--bootstrap must be at least 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    fp_rates = np.asarray(fp_rates, float)
    n_scans = len(matching.scans)
    order = np.argsort(matching.scan_index, kind="stable")
    is_nodule = matching.is_nodule[order]
    probability = matching.probability[order]
    missed = matching.missed[order]
    per_scan = np.bincount(matching.scan_index, minlength=n_scans)
    starts = np.concatenate(([0], np.cumsum(per_scan)[:-1]))

    rng = np.random.default_rng(seed)
    at_rates, band = [], []
    for _ in range(samples):
        drawn = rng.integers(n_scans, size=n_scans)
        rows = _gather(starts[drawn], per_scan[drawn])
        if not np.any(is_nodule[rows] > 0):
            continue
        curve = froc_curve(is_nodule[rows], probability[rows], missed[rows], n_scans)
        at_rates.append(curve.sensitivity_at(fp_rates))
        band.append(curve.sensitivity_at(BAND_FP_RATES))
    if not at_rates:
        raise ConfigError("no bootstrap sample drew a scan with a nodule; use more scans or samples")
    at_rates = np.asarray(at_rates)
    mean, lower, upper = _order_statistic_bounds(at_rates, confidence)
    cpm_mean, cpm_lower, cpm_upper = _order_statistic_bounds(at_rates.mean(axis=1), confidence)
    band_mean, band_lower, band_upper = _order_statistic_bounds(np.asarray(band), confidence)
    return BootstrapResult(
        samples=len(at_rates), requested=samples, confidence=confidence, seed=seed, fp_rates=fp_rates,
        sensitivity_mean=mean, sensitivity_lower=lower, sensitivity_upper=upper,
        cpm_mean=float(cpm_mean), cpm_lower=float(cpm_lower), cpm_upper=float(cpm_upper),
        band_fp_rates=BAND_FP_RATES, band_mean=band_mean, band_lower=band_lower, band_upper=band_upper,
    )


def _gather(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` ranges, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return offsets + np.arange(total)
