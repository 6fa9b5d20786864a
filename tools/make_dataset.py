#!/usr/bin/env python3
"""Write train / val / test phantom sets; the test split uses only held-out scanner profiles.

Each of OUT/train, OUT/val and OUT/test has the layout of make_phantoms.py.
Which profiles go where: see edge/phantom/dataset.py (and docs/phantoms.md).
"""

import argparse
import sys
import time

from edge.errors import EdgeError, report_user_error
from edge.phantom import make_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--train", type=int, required=True, help="number of training series")
    p.add_argument("--val", type=int, required=True, help="number of validation series")
    p.add_argument("--test", type=int, required=True, help="number of test series")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="rows = columns (default %(default)s)")
    p.add_argument("--slices", type=int, help="slices per series (default: whole chest)")
    p.add_argument("--no-localizer", action="store_true", help="do not add a LOCALIZER image to each series")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    totals = {"train": args.train, "val": args.val, "test": args.test}

    def report(split, i, series, folder):
        print(f"[{split} {i + 1}/{totals[split]}] {folder}: {series.profile.name}, {series.n_slices} slices, "
              f"{len(series.nodules)} nodule(s), {time.perf_counter() - start:.1f} s", flush=True)

    start = time.perf_counter()
    try:
        make_dataset(args.out, args.train, args.val, args.test, args.seed, size=args.size, n_slices=args.slices,
                     localizer=not args.no_localizer, progress=report)
    except EdgeError as exc:
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
