#!/usr/bin/env python3
"""Write synthetic chest-CT phantom series (DICOM) with LUNA16-style ground truth.

Writes OUT/series_NNNN/*.dcm, OUT/annotations.csv, OUT/annotations_meta.csv
and OUT/series.csv. Deterministic in --seed and the other options.
"""

import argparse
import sys
import time

from edge.errors import EdgeError, report_user_error
from edge.phantom import PROFILES, make_phantom_set


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--series", type=int, required=True, help="number of series")
    p.add_argument("--seed", type=int, default=0, help="set seed (default %(default)s)")
    p.add_argument("--profile", action="append", choices=sorted(PROFILES), metavar="NAME",
                   help="scanner profile; repeat for several (default: all of %s)" % ", ".join(sorted(PROFILES)))
    p.add_argument("--size", type=int, default=512, help="rows = columns (default %(default)s)")
    p.add_argument("--slices", type=int, help="slices per series (default: whole chest at the profile's spacing)")
    p.add_argument("--no-localizer", action="store_true",
                   help="do not add the coronal LOCALIZER image to each series folder")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    profiles = tuple(args.profile) if args.profile else tuple(PROFILES)

    def report(i, series, folder):
        acq = series.acquisition
        print(f"[{i + 1}/{args.series}] {folder}: {series.profile.name}, {series.n_slices} slices of "
              f"{acq.slice_thickness:g} mm every {acq.slice_spacing:g} mm, {len(series.nodules)} nodule(s), "
              f"{time.perf_counter() - start:.1f} s", flush=True)

    start = time.perf_counter()
    try:
        make_phantom_set(args.out, args.series, args.seed, profiles, size=args.size, n_slices=args.slices,
                         localizer=not args.no_localizer, progress=report)
    except EdgeError as exc:
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
