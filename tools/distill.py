#!/usr/bin/env python3
"""Train a student detector: distilled from the teacher, fine-tuned on the task alone, or from scratch (CPU).

    # pruned + distilled
    python tools/distill.py --student runs/pruned/pruned.pt --teacher runs/teacher/best.pt \\
        --data data/phantoms --out runs/distilled
    # the same steps without a teacher: pruned + fine-tuned, and the pruned architecture from scratch
    python tools/distill.py --student runs/pruned/pruned.pt --data data/phantoms --out runs/finetuned
    python tools/distill.py --student runs/pruned/pruned.pt --scratch --data data/phantoms --out runs/scratch
    # negative crops centred on the student's own false positives (tools/mine_hard_negatives.py)
    python tools/distill.py ... --hard-negatives runs/hard/student.csv --hard-negative-fraction 0.5
    # data parallel over N processes (gloo on CPUs); each rank draws its own crops
    torchrun --standalone --nproc_per_node=2 tools/distill.py ... --threads 1

Checkpoints: OUT/last.pt (every --checkpoint-every steps), OUT/best.pt (lowest
validation loss); --resume continues from OUT/last.pt at its step.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import EdgeError, report_user_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from toolchain.compression.distill import HEATMAP_LOSSES, DistillConfig
    from toolchain.training.hard_negatives import DEFAULT_HARD_NEGATIVE_FRACTION
    from toolchain.training.sampling import POSITIVE_SAMPLING_HELP, POSITIVE_SAMPLING_MODES
    from toolchain.training.slice_cache import CACHE_WORKERS_HELP
    from toolchain.training.trainer import DEVICES, TIME_BUDGET_HELP

    d = DistillConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="checkpoint giving the student's architecture and initial weights")
    p.add_argument("--teacher", help="teacher checkpoint; without it the student trains on the task loss alone")
    p.add_argument("--scratch", action="store_true", help="start from fresh random weights (no teacher)")
    p.add_argument("--data", required=True, help="dataset folder from tools/make_dataset.py (train/ and val/)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, train_log.csv")
    p.add_argument("--name", help="model name in the checkpoint's card (default: student-<mode>)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: default)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the networks run (cuda: a GPU PyTorch can see; one process; not bitwise "
                        "reproducible)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS", help=TIME_BUDGET_HELP)
    p.add_argument("--cache-workers", type=int, default=1, help=CACHE_WORKERS_HELP)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--positive-sampling", choices=POSITIVE_SAMPLING_MODES, default="slice", help=POSITIVE_SAMPLING_HELP)
    p.add_argument("--hard-negatives", metavar="CSV",
                   help="hard negatives from tools/mine_hard_negatives.py: negative crops centre on them")
    p.add_argument("--hard-negative-fraction", type=float, metavar="F",
                   help=f"share of the negative crops centred on a hard negative (default "
                        f"{DEFAULT_HARD_NEGATIVE_FRACTION} with --hard-negatives, else 0)")
    g = p.add_argument_group("distillation")
    g.add_argument("--heatmap-loss", choices=HEATMAP_LOSSES, default=d.heatmap_loss,
                   help="focal_mse: focal-weighted MSE on sigmoid maps; kl: channel-wise KL (default %(default)s)")
    g.add_argument("--heatmap-weight", type=float, default=d.heatmap_weight)
    g.add_argument("--regression-weight", type=float, default=d.regression_weight,
                   help="size/offset imitation at teacher-confident cells (default %(default)s)")
    g.add_argument("--confidence", type=float, default=d.confidence,
                   help="teacher score above which its size/offset are imitated (default %(default)s)")
    g.add_argument("--feature-weight", type=float, default=d.feature_weight,
                   help="last decoder feature imitation through a 1x1 adapter; 0 disables (default %(default)s)")
    g.add_argument("--peak-weight", type=float, default=d.peak_weight,
                   help="score matching at either network's peak cells, every peak weighted equally, so small "
                        "nodules count as much as large ones; 0 disables (default %(default)s)")
    g.add_argument("--peak-threshold", type=float, default=d.peak_threshold,
                   help="score from which a 3x3 local maximum is a peak (default %(default)s)")
    g.add_argument("--task-weight", type=float, default=d.task_weight)
    g.add_argument("--gamma", type=float, default=d.gamma, help="focal_mse modulation (default %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="kl temperature (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> Path:
    from toolchain.compression.distill import DistillConfig
    from toolchain.compression.student import train_student_from_files
    from toolchain.training.trainer import TrainConfig

    distill = DistillConfig(task_weight=args.task_weight, heatmap_weight=args.heatmap_weight,
                            heatmap_loss=args.heatmap_loss, gamma=args.gamma, temperature=args.temperature,
                            regression_weight=args.regression_weight, confidence=args.confidence,
                            feature_weight=args.feature_weight, peak_weight=args.peak_weight,
                            peak_threshold=args.peak_threshold)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                      checkpoint_every=args.checkpoint_every, val_every=args.val_every, device=args.device,
                      time_budget_s=args.time_budget)
    return train_student_from_files(args.student, args.data, args.out, cfg, teacher_path=args.teacher,
                                    scratch=args.scratch, distill=distill, name=args.name,
                                    progress=not args.no_progress, resume=args.resume,
                                    positive_sampling=args.positive_sampling, cache_workers=args.cache_workers,
                                    hard_negatives=args.hard_negatives,
                                    hard_negative_fraction=hard_negative_fraction(args))


def hard_negative_fraction(args) -> float:
    """--hard-negative-fraction as given, else its default with --hard-negatives and 0 without."""
    from toolchain.training.hard_negatives import DEFAULT_HARD_NEGATIVE_FRACTION

    if args.hard_negative_fraction is not None:
        return args.hard_negative_fraction
    return DEFAULT_HARD_NEGATIVE_FRACTION if args.hard_negatives else 0.0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = run(args)
    except EdgeError as e:
        return report_user_error(e)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"student checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
