"""One rank of the DDP test (launched by torchrun from test_compression_ddp.py).

Distils a tiny student, is interrupted mid-run, resumes from the checkpoint and
records its parameters for the test to compare across ranks.
"""

import argparse
import gc
from pathlib import Path

import numpy as np
import torch

from compression_helpers import (
    Interrupted,
    InterruptingSampler,
    make_sampler,
    tiny_specs,
    tiny_teacher,
    tiny_train_config,
)
from toolchain.compression.ddp import RankSampler, barrier, check_parameters_equal, init_distributed, shutdown
from toolchain.compression.distill import DistillConfig
from toolchain.compression.pruning import prune_by_ratio
from toolchain.compression.student import train_student


def train(ctx, out, steps, crops=-1, resume=False):
    teacher = tiny_teacher(seed=1).eval()
    student = prune_by_ratio(teacher, 0.5, "l1")
    sampler = make_sampler(0) if crops < 0 else InterruptingSampler(make_sampler(0), crops)
    train_student(student, tiny_specs(), sampler, None, tiny_train_config(steps), out, teacher=teacher,
                  distill=DistillConfig(feature_weight=0.05), ctx=ctx, progress=False, resume=resume)
    return student


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--interrupt-after-crops", type=int, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = init_distributed()
    try:
        try:
            train(ctx, args.out, args.steps, crops=args.interrupt_after_crops)
            interrupted_at = None
        except Interrupted:
            gc.collect()  # the interrupted run's DDP wrapper goes while the process group is alive
            barrier(ctx)
            interrupted_at = int(torch.load(Path(args.out) / "last.pt", weights_only=True)["step"])
        student = train(ctx, args.out, args.steps, resume=True)
        first = RankSampler(make_sampler(0), ctx.rank).sample(np.random.default_rng([0, 0]))[0]
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        torch.save({"world_size": ctx.world_size, "params": {k: v.detach() for k, v in student.named_parameters()},
                    "equal": check_parameters_equal(student, ctx), "first_crop": torch.from_numpy(first),
                    "interrupted_at": interrupted_at}, results / f"rank{ctx.rank}.pt")
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
