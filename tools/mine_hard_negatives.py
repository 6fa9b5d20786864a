#!/usr/bin/env python3
"""Find a model's hard negatives on training series: high-scoring peaks away from every nodule (CPU).

    python tools/mine_hard_negatives.py --checkpoint models/student/student.pt --data data/phantoms \\
        --out runs/hard/student.csv
    python tools/distill.py ... --data data/phantoms --hard-negatives runs/hard/student.csv \\
        --hard-negative-fraction 0.5

The model runs on every slice of DATA/train (preprocessed like training crops);
per series, the --max-per-series best peaks scoring at least --min-score that lie
more than a nodule diameter from every annotated nodule are written as CSV
(series_uid, slice_index, row, col in model-input pixels, score). Mine with the
model you will train, on the folder you will train on.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import ConfigError, EdgeError, InputError, report_user_error  # noqa: E402


def main(argv=None) -> int:
    from toolchain.training.slice_cache import CACHE_WORKERS_HELP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="detector checkpoint (teacher, pruned or distilled student)")
    p.add_argument("--data", required=True, help="dataset folder from tools/make_dataset.py (its train/ is mined)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--min-score", type=float, default=0.3, help="lowest peak score kept (default %(default)s)")
    p.add_argument("--max-per-series", type=int, default=20, help="best peaks kept per series (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--cache-workers", type=int, default=1, help=CACHE_WORKERS_HELP)
    args = p.parse_args(argv)
    try:
        if not 0.0 < args.min_score < 1.0:
            raise ConfigError(f"--min-score must be in (0, 1), got {args.min_score}")
        if args.max_per_series < 1:
            raise ConfigError(f"--max-per-series must be >= 1, got {args.max_per_series}")
        if args.cache_workers < 1:
            raise ConfigError(f"--cache-workers must be >= 1, got {args.cache_workers}")
        split = Path(args.data) / "train"
        if not (split / "annotations.csv").is_file():
            raise InputError(split, "missing split (expected annotations.csv from tools/make_dataset.py)")
        import torch

        from toolchain.export.onnx_export import load_checkpoint
        from toolchain.training.hard_negatives import mine_hard_negatives, write_hard_negatives
        from toolchain.training.slice_cache import cache_split

        if args.threads:
            torch.set_num_threads(args.threads)
        model, specs = load_checkpoint(args.checkpoint)
        t0 = time.time()
        series = cache_split(split, specs.preprocess, args.cache_workers)
        if not series:
            raise InputError(split, "no usable series")
        print(f"cached {len(series)} series ({sum(len(s.planes) for s in series)} slices) in "
              f"{time.time() - t0:.0f} s", flush=True)

        def progress(done, total, found):
            if done % 20 == 0 or done == total:
                print(f"{done}/{total} series, {found} hard negatives", flush=True)

        negatives = mine_hard_negatives(model, series, specs.preprocess.slices, specs.decode.stride,
                                        args.min_score, args.max_per_series, progress=progress)
        try:
            write_hard_negatives(args.out, negatives)
        except OSError as e:
            raise InputError(Path(args.out), f"cannot write: {e.strerror or e}") from None
    except EdgeError as e:
        return report_user_error(e)
    print(f"{len(negatives)} hard negatives on {len({h.series_uid for h in negatives})} of {len(series)} series "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
