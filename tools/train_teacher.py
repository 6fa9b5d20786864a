#!/usr/bin/env python3
"""Train the teacher detector on the phantom training split (CPU; ``--device cuda`` on a GPU).

    python tools/train_teacher.py --data data/phantoms --out runs/teacher [--steps 3000] [--resume]
    python tools/train_teacher.py --data data/phantoms --out runs/teacher_ft --init runs/teacher/last.pt --lr 5e-4
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import EdgeError, report_user_error  # noqa: E402
from toolchain.training.sampling import POSITIVE_SAMPLING_HELP, POSITIVE_SAMPLING_MODES  # noqa: E402
from toolchain.training.slice_cache import CACHE_WORKERS_HELP  # noqa: E402
from toolchain.training.trainer import DEVICES, TIME_BUDGET_HELP  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder from tools/make_dataset.py (train/ and val/)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, train_log.csv")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the network trains (cuda: a GPU PyTorch can see; not bitwise reproducible)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS", help=TIME_BUDGET_HELP)
    p.add_argument("--cache-workers", type=int, default=1, help=CACHE_WORKERS_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init", help="start from this checkpoint's weights (fine-tuning; fresh optimizer and schedule)")
    p.add_argument("--positive-sampling", choices=POSITIVE_SAMPLING_MODES, default="slice", help=POSITIVE_SAMPLING_HELP)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from toolchain.training.run import train_detector

        ckpt = train_detector(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, threads=args.threads, resume=args.resume,
                              progress=not args.no_progress, init=args.init,
                              positive_sampling=args.positive_sampling, device=args.device,
                              time_budget_s=args.time_budget, cache_workers=args.cache_workers)
    except EdgeError as e:
        return report_user_error(e)
    print(f"best checkpoint: {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
