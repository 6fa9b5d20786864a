"""Data-parallel training under ``torchrun``: process group, per-rank crops, DistributedDataParallel.

Run a training CLI as ``torchrun --standalone --nproc_per_node=N tools/distill.py ...``;
without torchrun's environment everything here is a single process. The gloo
backend runs on CPUs (NCCL when the model is on CUDA devices).

Each rank draws its own crops, deterministically: the trainer's per-step RNG
(seeded by (seed, step)) is the same on every rank, and :class:`RankSampler`
derives every crop's RNG from one draw of it plus the rank, so a resumed run
sees the same batches on the same ranks. The global batch is N x batch size.
"""

import gc
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from edge.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, logs and the progress bar."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(backend: str = "gloo") -> DistContext:
    """Join the process group torchrun describes (env://); a single-process context when not under torchrun."""
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(dist.get_rank(), dist.get_world_size())


def shutdown(ctx: DistContext) -> None:
    """Leave the process group: collect unreachable DDP wrappers first, then destroy the group.

    A DistributedDataParallel left in a reference cycle (e.g. by an exception's
    traceback) that is collected after the group is gone aborts the process
    (gloo: "terminate called without an active exception").
    """
    if ctx.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed (gradients averaged over ranks), else ``module``."""
    if not ctx.distributed:
        return module
    return nn.parallel.DistributedDataParallel(module)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class RankSampler:
    """A crop sampler whose crops differ between ranks but are fixed by (trainer RNG state, rank)."""

    def __init__(self, sampler, rank: int):
        self.sampler = sampler
        self.rank = rank

    def sample(self, rng: np.random.Generator):
        seed = int(rng.integers(2**63))
        return self.sampler.sample(np.random.default_rng([seed, self.rank]))


def check_parameters_equal(module: nn.Module, ctx: DistContext) -> bool:
    """True when every rank holds bit-identical parameters (a collective: call on every rank)."""
    if not ctx.distributed:
        return True
    flat = torch.cat([p.detach().reshape(-1).double() for p in unwrap(module).parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
