"""Training a student: distilled from the teacher, fine-tuned on the task alone, or trained from scratch.

One loop for the three (the comparison in the compression report needs the same
steps, data and schedule for each): :class:`~toolchain.training.trainer.Trainer`
with :class:`~toolchain.compression.distill.DistillLoss`, in one process or
under torchrun (:mod:`toolchain.compression.ddp`).
"""

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from edge.errors import ConfigError, InputError
from edge.model_file import ModelSpecs
from toolchain.compression.arch import arch_of, build_from_widths
from toolchain.compression.checkpoint import checkpoint_extra
from toolchain.compression.ddp import DistContext, RankSampler, barrier, init_distributed, shutdown, unwrap, wrap
from toolchain.compression.distill import DistillConfig, DistillLoss, StudentNet, make_adapter
from toolchain.export.onnx_export import load_checkpoint
from toolchain.training.trainer import TrainConfig, Trainer, cpu_state

ADAPTER_KEY = "feature_adapter"  # training-only weights, ignored by export


class StudentTrainer(Trainer):
    """:class:`Trainer` for a :class:`StudentNet`, possibly inside DistributedDataParallel.

    Checkpoints keep the bare student's weights as ``state_dict`` (so they load
    and export like any detector checkpoint) and the feature adapter under
    ``feature_adapter``. Only the main rank writes: the other ranks' trainers
    log to a throwaway folder and skip saving.
    """

    def __init__(self, net, sampler, val_sampler, cfg: TrainConfig, out_dir, checkpoint_extra: dict, loss_fn,
                 ctx: DistContext = DistContext(), progress: bool = True):
        self.ctx = ctx
        self._scratch = None
        if not ctx.is_main:
            self._scratch = tempfile.TemporaryDirectory(prefix=f"student-rank{ctx.rank}-")
            out_dir, progress = self._scratch.name, False
        super().__init__(net, sampler, val_sampler, cfg, out_dir, checkpoint_extra, loss_fn=loss_fn, progress=progress)

    @property
    def net(self) -> StudentNet:
        return unwrap(self.model)

    def save(self, name: str):
        if self.ctx.is_main:
            super().save(name)

    def _weights(self) -> dict:
        """The student's weights (what export reads), and the training-only adapter's when imitating features."""
        net = self.net
        weights = {"state_dict": cpu_state(net.student)}
        if net.adapter is not None:
            weights[ADAPTER_KEY] = cpu_state(net.adapter)
        return weights

    def _load_weights(self, state: dict, path: Path) -> None:
        net = self.net
        net.student.load_state_dict(state["state_dict"])
        if (net.adapter is not None) != (ADAPTER_KEY in state):
            raise InputError(path, "checkpoint and run differ in feature imitation (resume with the same "
                                   "feature weight)")
        if net.adapter is not None:
            net.adapter.load_state_dict(state[ADAPTER_KEY])

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def check_run(cfg: TrainConfig, ctx: DistContext) -> None:
    """ConfigError for a training config this process cannot run (before any data is read)."""
    cfg.check()
    if ctx.distributed and cfg.device != "cpu":
        raise ConfigError("data-parallel runs use gloo on CPUs; drop --device cuda or run one process")


def reinitialized(model, seed: int):
    """The same architecture with fresh random weights (training from scratch)."""
    torch.manual_seed(seed)
    return build_from_widths(arch_of(model))


def train_student(student, specs: ModelSpecs, sampler, val_sampler, cfg: TrainConfig, out_dir,
                  teacher: Optional[torch.nn.Module] = None, distill: DistillConfig = DistillConfig(),
                  card: Optional[dict] = None, ctx: DistContext = DistContext(), progress: bool = True,
                  resume: bool = False) -> Path:
    """Train ``student`` (with distillation from ``teacher`` when given); returns the best (or last) checkpoint.

    Checkpoints go to ``out_dir`` (``last.pt`` every ``cfg.checkpoint_every``
    steps, ``best.pt`` on validation); ``resume`` continues from ``last.pt``.
    """
    out = Path(out_dir)
    check_run(cfg, ctx)
    torch.manual_seed(cfg.seed)
    if teacher is not None:
        teacher.to(cfg.device)
    adapter = make_adapter(student, teacher) if teacher is not None and distill.feature_weight > 0 else None
    net = wrap(StudentNet(student.train(), adapter), ctx)
    if ctx.distributed:
        sampler = RankSampler(sampler, ctx.rank)
    card = dict(card or {}, distill=asdict(distill) if teacher is not None else None, world_size=ctx.world_size)
    extra = checkpoint_extra(student, specs, card)
    trainer = StudentTrainer(net, sampler, val_sampler, cfg, out, extra, DistillLoss(teacher, distill), ctx,
                             progress=progress and ctx.is_main)
    try:
        last = out / "last.pt"
        if resume and last.is_file():
            trainer.resume(last)
            if ctx.is_main:
                print(f"resumed at step {trainer.step}", flush=True)
        trainer.fit()
    finally:
        trainer.close()
    barrier(ctx)
    best = out / "best.pt"
    return best if best.is_file() else last


def student_mode(teacher_path, scratch: bool) -> str:
    """``distilled`` with a teacher, else ``finetuned`` (from the given weights) or ``scratch`` (fresh weights)."""
    if teacher_path and scratch:
        raise ConfigError("a student trained from scratch takes no teacher (drop --teacher or --scratch)")
    return "distilled" if teacher_path else "scratch" if scratch else "finetuned"


def train_student_from_files(student_path, data_dir, out_dir, cfg: TrainConfig, teacher_path=None,
                             scratch: bool = False, distill: DistillConfig = DistillConfig(),
                             name: Optional[str] = None, progress: bool = True, resume: bool = False,
                             positive_sampling: str = "slice", cache_workers: int = 1,
                             hard_negatives=None, hard_negative_fraction: float = 0.0) -> Path:
    """:func:`train_student` from checkpoints and a dataset folder; joins torchrun's process group when launched by it.

    The student's architecture (and, unless ``scratch``, its weights) come from
    ``student_path`` (e.g. ``tools/prune.py``'s pruned.pt); the teacher must
    take the same input (same preprocess spec). ``positive_sampling``: see
    :class:`toolchain.training.sampling.AugmentConfig`; ``hard_negatives`` (a CSV from
    ``tools/mine_hard_negatives.py``) and ``hard_negative_fraction``: see
    :func:`toolchain.training.run.build_samplers`.
    """
    from toolchain.training.hard_negatives import check_hard_negative_settings, read_hard_negatives
    from toolchain.training.run import build_samplers
    from toolchain.training.sampling import AugmentConfig

    mode = student_mode(teacher_path, scratch)
    distill.check()
    check_hard_negative_settings(hard_negatives is not None, hard_negative_fraction)
    negatives = read_hard_negatives(hard_negatives) if hard_negatives is not None else None
    ctx = init_distributed()
    try:
        check_run(cfg, ctx)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        student, specs = load_checkpoint(student_path)
        if scratch:
            student = reinitialized(student, cfg.seed)
        teacher = None
        if teacher_path:
            teacher, teacher_specs = load_checkpoint(teacher_path)
            if teacher_specs.preprocess != specs.preprocess:
                raise InputError(Path(teacher_path), f"teacher's preprocess spec differs from the student's "
                                                     f"({student_path}); distillation needs the same input")
        sampler, val_sampler = build_samplers(data_dir, specs.preprocess, specs.decode.stride,
                                              AugmentConfig(positive_sampling=positive_sampling,
                                                            hard_negative_fraction=hard_negative_fraction),
                                              cache_workers, negatives, hard_negatives)
        card = {"name": name or f"student-{mode}", "mode": mode, "student_init": str(student_path),
                "teacher": str(teacher_path) if teacher_path else None, "positive_sampling": positive_sampling,
                "device": cfg.device, "hard_negatives": str(hard_negatives) if hard_negatives else None,
                "hard_negative_fraction": hard_negative_fraction}
        return train_student(student, specs, sampler, val_sampler, cfg, out_dir, teacher=teacher, distill=distill,
                             card=card, ctx=ctx, progress=progress, resume=resume)
    finally:
        shutdown(ctx)
