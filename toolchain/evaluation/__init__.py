"""LUNA16-style detection evaluation: FROC / CPM, bootstrap CIs, per-slice metrics, report.

numpy only (matplotlib for the plot, imported when plotting); no torch.
"""

from toolchain.evaluation.bootstrap import BootstrapResult, bootstrap_froc
from toolchain.evaluation.froc import (
    FP_RATES,
    Candidates,
    FrocCurve,
    FrocResult,
    Matching,
    NoduleMeta,
    Nodules,
    evaluate_froc,
    froc_curve,
    match_candidates,
    nodule_groups,
    per_type_sensitivity,
    resolve_scans,
    threshold_at_fp_rate,
)
from toolchain.evaluation.per_slice import PerSliceMetrics, per_slice_metrics

__all__ = [
    "FP_RATES", "BootstrapResult", "Candidates", "FrocCurve", "FrocResult", "Matching", "NoduleMeta", "Nodules",
    "PerSliceMetrics", "bootstrap_froc", "evaluate_froc", "froc_curve", "match_candidates", "nodule_groups",
    "per_slice_metrics", "per_type_sensitivity", "resolve_scans", "threshold_at_fp_rate",
]
