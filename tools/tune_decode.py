#!/usr/bin/env python3
"""Choose the decode spec's 3-D shape prior on VALIDATION series; write the tuned spec as JSON.

    python tools/tune_decode.py --model runs/onnx/teacher.onnx --data data/phantoms/val data/phantoms/tune \\
        --out models/decode.json
    python tools/export_onnx.py --checkpoint ... --decode models/decode.json --out ...

Each --data folder needs annotations.csv and series.csv (tools/make_dataset.py
writes both). The network runs once per series; every (max_elongation,
min_z_span) pair rescores the same findings, and the pair with the best mean CPM
over the folders wins. Never tune on the test split.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import ConfigError, EdgeError, report_user_error  # noqa: E402

DEFAULT_MAX_ELONGATION = "none,3,2,1.5,1.25,1,0.9,0.8"
DEFAULT_MIN_Z_SPAN = "none,0.5,0.6,0.7,0.8,0.9"


def parse_grid(text: str, option: str):
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "off"):
            values.append(None)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not a number or 'none'") from None
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="ONNX model (its embedded decode spec is the starting point)")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="annotated validation folder(s)")
    p.add_argument("--max-elongation", default=DEFAULT_MAX_ELONGATION,
                   help="comma list of values to try; 'none' switches the penalty off (default %(default)s)")
    p.add_argument("--min-z-span", default=DEFAULT_MIN_Z_SPAN,
                   help="comma list of values to try; 'none' switches the penalty off (default %(default)s)")
    p.add_argument("--out", required=True, help="tuned decode spec (JSON) to write")
    p.add_argument("--json", help="write the whole grid (CPM per folder) here")
    args = p.parse_args(argv)
    try:
        from edge.backends.onnxruntime_runner import open_onnxruntime_runner
        from toolchain.evaluation.decode_tuning import AnnotatedFolder, detect_without_shape_prior, grid_search

        grid_me = parse_grid(args.max_elongation, "--max-elongation")
        grid_ms = parse_grid(args.min_z_span, "--min-z-span")
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
        points = grid_search(found, folders, specs.decode, grid_me, grid_ms)
        best = points[0]
        tuned = dataclasses.replace(specs.decode, max_elongation=best.max_elongation, min_z_span=best.min_z_span)
    except EdgeError as e:
        return report_user_error(e)
    names = " ".join(str(f.path) for f in folders)
    print(f"max_elongation min_z_span  mean CPM  CPM per folder ({names})")
    for pt in points:
        print(f"{str(pt.max_elongation):>14} {str(pt.min_z_span):>10}  {pt.mean_cpm:8.4f}  "
              + " ".join(f"{c:.4f}" for c in pt.cpm))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(tuned.to_json() + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(args.model), "folders": [str(f.path) for f in folders],
            "grid": [dict(max_elongation=pt.max_elongation, min_z_span=pt.min_z_span, cpm=list(pt.cpm),
                          mean_cpm=pt.mean_cpm) for pt in points],
            "chosen": tuned.to_dict()}, indent=1) + "\n")
    print(f"chosen: max_elongation {best.max_elongation}, min_z_span {best.min_z_span} "
          f"(mean CPM {best.mean_cpm:.4f}); decode spec written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
