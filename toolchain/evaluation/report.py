"""Evaluation report: a JSON-ready dict, a text summary and the FROC plot (PNG)."""

import json
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from edge.errors import InputError
from toolchain.evaluation.bootstrap import BootstrapResult
from toolchain.evaluation.froc import FrocResult
from toolchain.evaluation.per_slice import PerSliceMetrics


def _finite_or_none(values):
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, float)]


def build_report(
    froc: FrocResult,
    scans_note: str,
    bootstrap: Optional[BootstrapResult] = None,
    per_type: Optional[Dict[str, Dict[str, dict]]] = None,
    per_slice: Optional[PerSliceMetrics] = None,
) -> Dict[str, object]:
    """Everything the CLI writes to JSON; non-finite thresholds become null."""
    report: Dict[str, object] = {
        "cpm": froc.cpm,
        "operating_points": [
            {"fp_per_scan": r, "sensitivity": float(s)} for r, s in zip(froc.fp_rates, froc.sensitivities)
        ],
        "scans_note": scans_note,
        "counts": dict(froc.matching.counts),
        "froc_curve": {
            "fp_per_scan": [float(v) for v in froc.curve.fps_per_scan],
            "sensitivity": [float(v) for v in froc.curve.sensitivity],
            "threshold": _finite_or_none(froc.curve.thresholds),
        },
    }
    if bootstrap is not None:
        report["bootstrap"] = {
            "samples": bootstrap.samples,
            "requested": bootstrap.requested,
            "seed": bootstrap.seed,
            "confidence": bootstrap.confidence,
            "cpm": {"mean": bootstrap.cpm_mean, "lower": bootstrap.cpm_lower, "upper": bootstrap.cpm_upper},
            "operating_points": [
                {"fp_per_scan": float(r), "mean": float(m), "lower": float(lo), "upper": float(hi)}
                for r, m, lo, hi in zip(bootstrap.fp_rates, bootstrap.sensitivity_mean,
                                        bootstrap.sensitivity_lower, bootstrap.sensitivity_upper)
            ],
        }
        if np.array_equal(bootstrap.fp_rates, froc.fp_rates):
            for point, b in zip(report["operating_points"], report["bootstrap"]["operating_points"]):
                point["ci"] = [b["lower"], b["upper"]]
        report["cpm_ci"] = [bootstrap.cpm_lower, bootstrap.cpm_upper]
    if per_type is not None:
        report["per_type"] = {
            group: {label: dict(v, threshold=_finite_or_none([v["threshold"]])[0]) for label, v in points.items()}
            for group, points in per_type.items()
        }
    if per_slice is not None:
        report["per_slice"] = per_slice.to_dict()
    return report


def format_summary(report: Dict[str, object]) -> str:
    """Human-readable lines; the last one is ``CPM <value>``."""
    counts = report["counts"]
    lines = [
        f"scans: {report['scans_note']}",
        f"nodules: {counts['nodules']} ({counts['true_positives']} hit by a candidate, "
        f"{counts['false_negatives']} missed); candidates: {counts['candidates']} "
        f"({counts['false_positives']} FP, {counts['double_detections_ignored']} double hits ignored, "
        f"{counts['irrelevant_candidates']} on excluded findings)",
    ]
    if counts["candidates_over_max_marks"]:
        lines.append(f"dropped {counts['candidates_over_max_marks']} candidates over the per-scan mark limit")
    if counts["nodules_outside_scans"] or counts["candidates_outside_scans"]:
        lines.append(f"ignored (series not in the scan list): {counts['nodules_outside_scans']} nodules, "
                     f"{counts['candidates_outside_scans']} candidates")
    lines.append("FP/scan  sensitivity" + ("  95% CI" if "bootstrap" in report else ""))
    for point in report["operating_points"]:
        ci = f"  [{point['ci'][0]:.4f}, {point['ci'][1]:.4f}]" if "ci" in point else ""
        lines.append(f"{point['fp_per_scan']:>7g}  {point['sensitivity']:.4f}{ci}")
    if "bootstrap" in report:
        b = report["bootstrap"]
        lines.append(f"CPM {int(round(100 * b['confidence']))}% CI [{b['cpm']['lower']:.4f}, {b['cpm']['upper']:.4f}] "
                     f"({b['samples']} bootstrap samples over scans, seed {b['seed']})")
    for group, points in report.get("per_type", {}).items():
        cells = []
        for label, v in points.items():
            sens = "n/a" if v["sensitivity"] is None else f"{v['sensitivity']:.3f}"
            cells.append(f"{label}: {sens} ({v['detected']}/{v['nodules']})")
        lines.append(f"sensitivity {group}: " + ", ".join(cells))
    if "per_slice" in report:
        s = report["per_slice"]
        sens = "n/a" if s["sensitivity"] is None else f"{s['sensitivity']:.4f}"
        lines.append(
            f"per-slice @ {s['threshold']:g}: sensitivity {sens} ({s['detected_lesion_slices']}/{s['lesion_slices']} "
            f"lesion-slices), {s['fp_per_image']:.3f} FP/image over {s['images']} images "
            f"(worst image {s['max_fp_on_one_image']}); criteria (sens >= {s['sensitivity_target']:g}, "
            f"FP/image <= {s['fp_per_image_limit']:g}): {'met' if s['meets_criteria'] else 'not met'}")
    lines.append(f"CPM {report['cpm']:.4f}")
    return "\n".join(lines)


def write_json(report: Dict[str, object], path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise InputError(path, f"cannot write JSON: {exc}") from None


def plot_froc(froc: FrocResult, path, bootstrap: Optional[BootstrapResult] = None, title: str = "FROC") -> None:
    """FROC curve on a log FP/scan axis from 1/8 to 8, with the bootstrap band if given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    rates = np.geomspace(froc.fp_rates[0], froc.fp_rates[-1], 512)
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(rates, froc.curve.sensitivity_at(rates), color="b", lw=2, label=f"CPM {froc.cpm:.4f}")
    ax.plot(froc.fp_rates, froc.sensitivities, "o", color="b", ms=4)
    if bootstrap is not None:
        pct = int(round(100 * bootstrap.confidence))
        ax.plot(bootstrap.band_fp_rates, bootstrap.band_mean, color="b", ls="--", lw=1, label="bootstrap mean")
        ax.fill_between(bootstrap.band_fp_rates, bootstrap.band_lower, bootstrap.band_upper,
                        color="b", alpha=0.12, label=f"{pct}% CI")
    ax.set_xscale("log")
    ax.set_xlim(froc.fp_rates[0], froc.fp_rates[-1])
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(FixedLocator(list(froc.fp_rates)))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{r:g}" for r in froc.fp_rates]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yticks(np.arange(0, 1.01, 0.1))
    ax.grid(True, which="both", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    except OSError as exc:
        raise InputError(path, f"cannot write plot: {exc}") from None
