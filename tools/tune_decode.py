#!/usr/bin/env python3
"""Choose a model's decode spec on VALIDATION series (shape prior or false-positive rescorer, report threshold).

    python tools/tune_decode.py --model runs/onnx/teacher.onnx --data data/phantoms/val data/phantoms/tune \\
        --rescorer --out models/teacher/decode.json --json models/teacher/decode_tuning.json
    python tools/export_onnx.py --checkpoint ... --decode models/teacher/decode.json --out ...

Each --data folder needs annotations.csv and series.csv (tools/make_dataset.py
writes both). The network runs once per series; every (max_elongation,
min_z_span) pair rescores the same findings, and the pair with the best mean CPM
over the folders wins. Never tune on the test split.

With --rescorer, a logistic false-positive rescorer over each finding's track
(edge/decode/rescoring.py) is also fitted, for every --rescorer-l2 value, and
scored by cross-validation over the series (each series rescored by a model
fitted without it). The shape prior is cross-validated on the same folds (each
series scored by the pair that was best on the other folds' series), and the
rescorer goes into the spec only when its cross-validated mean CPM beats that.
The grid's own best is scored on the series it was chosen from, so it reads
higher than the prior will on new series; comparing it with the rescorer's
cross-validated number kept the prior for models where the rescorer held up
better on held-out scanner profiles.

The spec's report_threshold is set at the chosen scoring's operating point of
--report-fp-per-scan false positives per scan over all the folders (the
rescorer's from its cross-validated probabilities): the probability from which
the runtime reports findings when the site does not set outputs.report_threshold.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import ConfigError, EdgeError, report_user_error  # noqa: E402

DEFAULT_MAX_ELONGATION = "none,3,2,1.5,1.25,1,0.9,0.8"
DEFAULT_MIN_Z_SPAN = "none,0.5,0.6,0.7,0.8,0.9"
DEFAULT_RESCORER_L2 = "0.3,3,30"


def parse_grid(text: str, option: str, allow_none: bool = True):
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if allow_none and item in ("none", "off"):
            values.append(None)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not a number{' or none' if allow_none else ''}") from None
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="ONNX model (its embedded decode spec is the starting point)")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="annotated validation folder(s)")
    p.add_argument("--max-elongation", default=DEFAULT_MAX_ELONGATION,
                   help="comma list of values to try; 'none' switches the penalty off (default %(default)s)")
    p.add_argument("--min-z-span", default=DEFAULT_MIN_Z_SPAN,
                   help="comma list of values to try; 'none' switches the penalty off (default %(default)s)")
    p.add_argument("--rescorer", action="store_true",
                   help="also fit the logistic false-positive rescorer; keep it when it cross-validates better")
    p.add_argument("--rescorer-l2", default=DEFAULT_RESCORER_L2,
                   help="comma list of L2 penalties to try for the rescorer (default %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds over the series (default %(default)s)")
    p.add_argument("--report-fp-per-scan", type=float, default=1.0,
                   help="operating point for the spec's report_threshold, in false positives per scan "
                        "(default %(default)s)")
    p.add_argument("--out", required=True, help="tuned decode spec (JSON) to write")
    p.add_argument("--json", help="write the whole grid (CPM per folder) here")
    args = p.parse_args(argv)
    try:
        from edge.backends.onnxruntime_runner import open_onnxruntime_runner
        from toolchain.evaluation.decode_tuning import AnnotatedFolder, detect_without_shape_prior, tune_decode_spec

        grid_me = parse_grid(args.max_elongation, "--max-elongation")
        grid_ms = parse_grid(args.min_z_span, "--min-z-span")
        l2_values = parse_grid(args.rescorer_l2, "--rescorer-l2", allow_none=False)
        if any(v < 0 for v in l2_values):
            raise ConfigError(f"--rescorer-l2: penalties must be >= 0, got {args.rescorer_l2}")
        if args.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {args.folds}")
        if not args.report_fp_per_scan > 0:
            raise ConfigError(f"--report-fp-per-scan must be > 0, got {args.report_fp_per_scan}")
        folders = [AnnotatedFolder.open(d) for d in args.data]
        runner, specs = open_onnxruntime_runner(args.model)
        try:
            found = []
            for folder in folders:
                found.append(detect_without_shape_prior(folder, runner, specs))
                print(f"{folder.path}: {len(found[-1])} series detected", flush=True)
        finally:
            runner.deactivate()
        # validated here, before anything is written: a bad grid value is a ConfigError naming the field
        tuning = tune_decode_spec(found, folders, specs.decode, grid_me, grid_ms,
                                  l2_values if args.rescorer else (), args.folds, args.report_fp_per_scan)
    except EdgeError as e:
        return report_user_error(e)
    tuned, points, best = tuning.spec, tuning.grid, tuning.grid[0]
    names = " ".join(str(f.path) for f in folders)
    print(f"max_elongation min_z_span  mean CPM  CPM per folder ({names})")
    for pt in points:
        print(f"{str(pt.max_elongation):>14} {str(pt.min_z_span):>10}  {pt.mean_cpm:8.4f}  "
              + " ".join(f"{c:.4f}" for c in pt.cpm))
    prior_cv, prior_cv_mean = tuning.prior_cross_validated, tuning.prior_cross_validated_mean
    if prior_cv is not None:
        print(f"shape prior   cross-validated mean CPM {prior_cv_mean:.4f}  " + " ".join(f"{c:.4f}" for c in prior_cv))
    for row in tuning.rescorer_trials:
        print(f"rescorer l2 {row['l2']:>8g}  cross-validated mean CPM {row['mean_cpm']:.4f}  "
              + " ".join(f"{c:.4f}" for c in row["cpm"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(tuned.to_json() + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(args.model), "folders": [str(f.path) for f in folders],
            "grid": [dict(max_elongation=pt.max_elongation, min_z_span=pt.min_z_span, cpm=list(pt.cpm),
                          mean_cpm=pt.mean_cpm) for pt in points],
            "rescorer_cross_validated": tuning.rescorer_trials, "folds": args.folds if args.rescorer else None,
            "shape_prior_cross_validated": (None if prior_cv is None else
                                            {"cpm": list(prior_cv), "mean_cpm": prior_cv_mean}),
            "report_fp_per_scan": args.report_fp_per_scan,
            "chosen": tuned.to_dict()}, indent=1) + "\n")
    print(f"report_threshold {tuned.report_threshold:g}: {args.report_fp_per_scan:g} false positive(s) per scan "
          "on these series")
    if tuning.rescorer_l2 is not None:
        top = next(r for r in tuning.rescorer_trials if r["l2"] == tuning.rescorer_l2)
        print(f"chosen: the rescorer (l2 {top['l2']:g}, cross-validated mean CPM {top['mean_cpm']:.4f} > "
              f"{prior_cv_mean:.4f} of the shape prior, cross-validated); decode spec written "
              f"to {args.out}")
    else:
        print(f"chosen: max_elongation {best.max_elongation}, min_z_span {best.min_z_span} "
              f"(mean CPM {best.mean_cpm:.4f}); decode spec written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
