#!/usr/bin/env python3
"""Prune the teacher into a smaller detector: structured channel pruning + fine-tuning rounds (CPU).

    python tools/prune.py --teacher runs/teacher/best.pt --data data/phantoms --out runs/pruned \\
        [--target-ratio 0.3] [--rounds 3] [--finetune-steps 300] [--importance l1] [--resume] \\
        [--min-heads 16] [--min-level 0=16] [--min-conv NAME=W]

One pruning ratio for all convs is found per round; --min-* floors stop chosen convs
(e.g. the heads, or the high-resolution levels, which cost MACs but few parameters)
at a width. Writes OUT/pruned.pt (loads like any detector checkpoint: export, distill,
evaluate) and OUT/prune_summary.json; round k's fine-tuning is in OUT/round<k>/.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import EdgeError, report_user_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from toolchain.compression.pruning import IMPORTANCE_CRITERIA, PruneConfig

    d = PruneConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt)")
    p.add_argument("--data", required=True, help="dataset folder from tools/make_dataset.py (train/ and val/)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--target-ratio", type=float, default=d.target_ratio,
                   help="final parameters and MACs as a fraction of the teacher's (default %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="prune + fine-tune rounds (default %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="task-loss fine-tuning steps per round (default %(default)s)")
    p.add_argument("--importance", choices=IMPORTANCE_CRITERIA, default=d.criterion,
                   help="channel importance: l1/l2 filter norm, bn BatchNorm scale, taylor (default %(default)s)")
    p.add_argument("--round-to", type=int, default=d.round_to, help="channel multiple (default %(default)s)")
    p.add_argument("--taylor-batches", type=int, default=d.taylor_batches,
                   help="batches of gradients for --importance taylor (default %(default)s)")
    p.add_argument("--min-level", action="append", default=[], metavar="K=W",
                   help="no conv at resolution level K (0: stride 2) is pruned below W channels (repeatable)")
    p.add_argument("--min-heads", type=int, default=None, metavar="W",
                   help="the heads' 3x3 convs are not pruned below W channels")
    p.add_argument("--min-conv", action="append", default=[], metavar="NAME=W",
                   help="one conv's floor by name, e.g. enc.1.block.0.0=32 (repeatable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> Path:
    from toolchain.compression.pruning import PruneConfig, prune_checkpoint
    from toolchain.compression.widening import resolve_width_settings
    from toolchain.export.onnx_export import load_checkpoint
    from toolchain.training.trainer import TrainConfig

    floors = resolve_width_settings(len(load_checkpoint(args.teacher)[0].enc), args.min_level, args.min_heads,
                                    args.min_conv)
    cfg = PruneConfig(target_ratio=args.target_ratio, rounds=args.rounds, finetune_steps=args.finetune_steps,
                      criterion=args.importance, round_to=args.round_to, taylor_batches=args.taylor_batches,
                      min_widths=tuple(sorted(floors.items())))
    train_cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                            warmup_steps=min(50, max(1, args.finetune_steps // 10)))
    return prune_checkpoint(args.teacher, args.data, args.out, cfg, train_cfg, progress=not args.no_progress,
                            resume=args.resume)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = run(args)
    except EdgeError as e:
        return report_user_error(e)
    print(f"pruned checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
