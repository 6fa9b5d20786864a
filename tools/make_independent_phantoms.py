#!/usr/bin/env python3
"""Write chest-CT phantom series from a second, independent generator (DICOM + LUNA16 ground truth).

Nothing here is trained on these series: they check that a model generalises
beyond edge.phantom (toolchain/evaluation/independent_phantom.py says how they
differ). Writes OUT/series_NNNN/, OUT/annotations.csv, OUT/annotations_meta.csv
and OUT/series.csv, the layout tools/evaluate.py and `edge detect` read.
Deterministic in --seed and the other options.
"""

import argparse
import sys
import time

from edge.errors import EdgeError, report_user_error
from toolchain.evaluation.independent_phantom import make_independent_set


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--series", type=int, required=True, help="number of series")
    p.add_argument("--seed", type=int, default=0, help="set seed (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="rows = columns (default %(default)s)")
    p.add_argument("--slices", type=int, default=80, help="slices per series (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes (default %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()

    def report(i, row):
        print(f"[{i + 1}/{args.series}] {row['folder']}: {row['profile']}, {row['n_slices']} slices of "
              f"{row['slice_thickness']:g} mm every {row['slice_spacing']:g} mm, {row['storage']}, {row['orientation']}, "
              f"{row['transfer_syntax']}, {row['n_nodules']} nodule(s), {time.perf_counter() - start:.1f} s", flush=True)

    try:
        make_independent_set(args.out, args.series, args.seed, size=args.size, n_slices=args.slices,
                             workers=args.workers, progress=report)
    except EdgeError as exc:
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
