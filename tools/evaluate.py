#!/usr/bin/env python3
"""LUNA16-style FROC / CPM evaluation of nodule detections (thin CLI over toolchain.evaluation)."""

import argparse
import sys

from edge.errors import ConfigError, EdgeError, report_user_error
from toolchain.evaluation import io, report
from toolchain.evaluation.bootstrap import bootstrap_froc
from toolchain.evaluation.froc import (
    MAX_MARKS_PER_SCAN,
    evaluate_froc,
    nodule_groups,
    per_type_sensitivity,
    resolve_scans,
    threshold_at_fp_rate,
)
from toolchain.evaluation.per_slice import per_slice_metrics

TYPE_FP_RATES = (1.0, 4.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--predictions", required=True, help="CSV: seriesuid,coordX,coordY,coordZ,probability (mm)")
    p.add_argument("--annotations", required=True, help="CSV: seriesuid,coordX,coordY,coordZ,diameter_mm")
    scans = p.add_mutually_exclusive_group()
    scans.add_argument("--scans", type=int, help="number of scans (scans without findings count toward FP/scan)")
    scans.add_argument("--series-list", help="CSV with a seriesuid column listing every evaluated scan")
    p.add_argument("--annotations-meta", help="CSV: seriesuid,index,type,location,diameter_mm for per-type sensitivity")
    p.add_argument("--excluded", help="annotations_excluded.csv: marks on these findings are ignored, not FPs")
    p.add_argument("--max-marks", type=int, default=MAX_MARKS_PER_SCAN,
                   help="keep at most this many marks per scan, as the official evaluation "
                        "(0: no limit; default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="bootstrap samples over scans for 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    p.add_argument("--threshold", type=float,
                   help="probability threshold for per-type sensitivity and per-slice metrics")
    p.add_argument("--slice-predictions", help="per-slice findings CSV (coordZ = image z) for per-slice metrics")
    p.add_argument("--slices", help="CSV: seriesuid,coordZ, one row per image (needed with --slice-predictions)")
    p.add_argument("--out-json", help="write the full report as JSON")
    p.add_argument("--out-plot", help="write the FROC plot as PNG")
    return p


def run(args) -> str:
    if args.scans is not None and args.scans < 1:
        raise ConfigError(f"--scans must be at least 1, got {args.scans}")
    if args.max_marks < 0:
        raise ConfigError(f"--max-marks must be 0 (no limit) or more, got {args.max_marks}")
    if args.slice_predictions and not (args.slices and args.threshold is not None):
        raise ConfigError("--slice-predictions needs --slices and --threshold")
    candidates = io.read_predictions(args.predictions)
    nodules = io.read_annotations(args.annotations)
    excluded = io.read_annotations(args.excluded) if args.excluded else None
    series = io.read_series_list(args.series_list) if args.series_list else None
    meta = io.read_annotations_meta(args.annotations_meta, nodules) if args.annotations_meta else None

    scans, scans_note = resolve_scans(nodules, candidates, series, args.scans)
    froc = evaluate_froc(nodules, candidates, scans, excluded, args.max_marks)
    boot = bootstrap_froc(froc.matching, args.bootstrap, args.seed) if args.bootstrap else None

    thresholds = {f"{r:g} FP/scan": threshold_at_fp_rate(froc.matching, r) for r in TYPE_FP_RATES}
    if args.threshold is not None:
        thresholds[f"p>={args.threshold:g}"] = args.threshold
    per_type = per_type_sensitivity(froc.matching, nodule_groups(nodules, meta), thresholds)

    per_slice = None
    if args.slice_predictions:
        per_slice = per_slice_metrics(nodules, io.read_predictions(args.slice_predictions),
                                      io.read_slice_positions(args.slices), args.threshold,
                                      findings_source=args.slice_predictions)

    result = report.build_report(froc, scans_note, boot, per_type, per_slice)
    if args.out_json:
        report.write_json(result, args.out_json)
    if args.out_plot:
        report.plot_froc(froc, args.out_plot, boot)
    return report.format_summary(result)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except EdgeError as exc:
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
