"""Structured channel pruning of the detector with Torch-Pruning's dependency graph.

Whole output channels are removed from every 3x3 conv (and, through the
dependency graph, the matching BatchNorm channels and the input channels of
every consumer, across max-pool, upsampling and the skip concatenations). The
heads' final 1x1 convs are left alone, so the outputs do not change. Widths are
rounded to multiples of 8 (TensorRT and INT8 kernels want them). After each cut
the network is rebuilt as a :class:`~toolchain.compression.arch.SlimCenterNetUNet`,
a real smaller model, not a mask.

Iterative schedule: round k of K prunes to ``target ** (k / K)`` of the
reference's parameters *and* MACs, then fine-tunes with the task loss. Within a
round, one pruning ratio for all layers is found
by bisection so that both budgets hold (thin layers stop at ``round_to`` channels,
and a conv given a floor in ``PruneConfig.min_widths`` stops at its floor: the
heads and the high-resolution levels are cheap in parameters, so floors there
trade MACs for a wider path where small nodules are resolved).
"""

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch_pruning as tp

from edge.errors import ConfigError
from edge.model_file import ModelSpecs
from toolchain.compression.arch import arch_of, build_from_widths, conv_names
from toolchain.compression.checkpoint import checkpoint_extra, save_checkpoint
from toolchain.compression.flops import ModelCost, model_cost
from toolchain.export.onnx_export import load_checkpoint
from toolchain.models.centernet_unet import OUTPUT_STRIDE, CenterNetUNet
from toolchain.training.losses import detection_loss
from toolchain.training.sampling import CropSampler, collate
from toolchain.training.trainer import TrainConfig, Trainer, to_tensors

IMPORTANCE_CRITERIA = ("l1", "l2", "bn", "taylor")
ROUND_TO = 8
MAX_RATIO = 0.95  # largest per-round channel pruning ratio the bisection tries
BISECTION_STEPS = 12


def make_importance(criterion: str):
    """Torch-Pruning importance: ``l1``/``l2`` filter magnitude, ``bn`` BatchNorm scale, ``taylor`` first-order."""
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "bn":
        return tp.importance.BNScaleImportance()
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    raise ConfigError(f"importance criterion must be one of {', '.join(IMPORTANCE_CRITERIA)}, got {criterion!r}")


def head_output_convs(model: CenterNetUNet) -> List[torch.nn.Module]:
    """The final 1x1 convs of the heads: their output channels are the model's outputs and are never pruned."""
    return [model.heatmap.out, model.size.out, model.offset.out]


def example_shape(model: CenterNetUNet) -> tuple:
    """A small (C, H, W) the model accepts; MAC *ratios* at it equal those at any valid input size."""
    side = OUTPUT_STRIDE * 2 ** (len(model.enc) - 1) * 4
    return (model.in_channels, side, side)


def rebuild(model: CenterNetUNet) -> CenterNetUNet:
    """The pruned ``model`` as a freshly built network with its exact widths (and weights, buffers, mode)."""
    slim = build_from_widths(arch_of(model))
    slim.load_state_dict(model.state_dict(), strict=True)
    return slim.train(model.training)


def check_min_widths(model: CenterNetUNet, min_widths: Mapping[str, int], round_to: int = ROUND_TO) -> None:
    """ConfigError unless every floor names a prunable conv of ``model``, is a multiple of ``round_to`` and
    is at most the conv's present width."""
    modules = dict(model.named_modules())
    names = conv_names(len(model.enc))
    for name, width in min_widths.items():
        if name not in names:
            raise ConfigError(f"no prunable conv named {name!r} (expected one of {', '.join(names)})")
        if width < round_to or width % round_to:
            raise ConfigError(f"the floor of {name} must be a multiple of {round_to} channels, got {width}")
        if width > modules[name].out_channels:
            raise ConfigError(f"the floor of {name} ({width} channels) is above its {modules[name].out_channels}")


def prune_by_ratio(model: CenterNetUNet, ratio: float, criterion: str, round_to: int = ROUND_TO,
                   min_widths: Optional[Mapping[str, int]] = None) -> CenterNetUNet:
    """A copy of ``model`` with ``ratio`` of every prunable conv's channels removed (``model`` itself is untouched).

    Each conv keeps at least ``round_to`` channels (Torch-Pruning would otherwise
    round a thin layer down to nothing and skip it), and at least its floor in
    ``min_widths`` ({conv name: channels}). For ``taylor`` the model's
    parameters must hold gradients (see :func:`accumulate_gradients`).
    """
    min_widths = dict(min_widths or {})
    check_min_widths(model, min_widths, round_to)
    pruned = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), pruned.parameters()):
        dst.requires_grad_(True)  # the dependency graph is traced through autograd (a frozen teacher has none)
        dst.grad = None if src.grad is None else src.grad.clone()
    if ratio > 0:
        modules = dict(pruned.named_modules())
        per_layer = {}
        for name in conv_names(len(pruned.enc)):
            conv = modules[name]
            keep = max(round_to, min_widths.get(name, 0))
            per_layer[conv] = max(0.0, min(ratio, 1.0 - (keep + 0.5) / conv.out_channels))
        example = torch.zeros(1, *example_shape(model))
        pruner = tp.pruner.BasePruner(
            pruned, example, importance=make_importance(criterion), pruning_ratio=ratio,
            pruning_ratio_dict=per_layer, round_to=round_to, ignored_layers=head_output_convs(pruned),
        )
        pruner.step()
    pruned.zero_grad(set_to_none=True)
    return rebuild(pruned)


def prune_to_budget(model: CenterNetUNet, budget: ModelCost, criterion: str, round_to: int = ROUND_TO,
                    min_widths: Optional[Mapping[str, int]] = None) -> CenterNetUNet:
    """The least-pruned copy of ``model`` whose parameters and MACs (at :func:`example_shape`) fit ``budget``
    (convs stop at their floors in ``min_widths``, see :func:`prune_by_ratio`)."""
    shape = example_shape(model)

    def fits(m) -> bool:
        cost = model_cost(m, shape)
        return cost.parameters <= budget.parameters and cost.macs <= budget.macs

    if fits(model):
        return rebuild(model)
    smallest = prune_by_ratio(model, MAX_RATIO, criterion, round_to, min_widths)
    if not fits(smallest):
        cost = model_cost(smallest, shape)
        raise ConfigError(f"pruning cannot reach the budget of {budget.parameters:,} parameters / {budget.macs:,} MACs "
                          f"(at most {MAX_RATIO:.0%} of channels per round gives {cost.parameters:,} / {cost.macs:,}); "
                          f"use more rounds, a larger target ratio or lower floors")
    lo, hi, best = 0.0, MAX_RATIO, smallest
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        candidate = prune_by_ratio(model, mid, criterion, round_to, min_widths)
        if fits(candidate):
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def accumulate_gradients(model: CenterNetUNet, sampler: CropSampler, batches: int, batch_size: int, seed: int) -> None:
    """Task-loss gradients summed over fixed batches (eval mode: BatchNorm statistics untouched), for Taylor."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    rng = np.random.default_rng([seed, 2**31])
    for _ in range(batches):
        x, *targets = to_tensors(collate([sampler.sample(rng) for _ in range(batch_size)]))
        loss, _ = detection_loss(model(x), targets)
        loss.backward()
    model.train(was_training)


def round_budgets(reference: ModelCost, target_ratio: float, rounds: int) -> List[ModelCost]:
    """Per-round budgets: ``target_ratio ** (k / rounds)`` of the reference, k = 1..rounds."""
    fractions = [target_ratio ** (k / rounds) for k in range(1, rounds + 1)]
    return [ModelCost(int(reference.parameters * f), int(reference.macs * f)) for f in fractions]


@dataclass(frozen=True)
class PruneConfig:
    target_ratio: float = 0.3  # of the teacher's parameters and MACs
    rounds: int = 3
    finetune_steps: int = 300  # per round, task loss
    criterion: str = "l1"
    round_to: int = ROUND_TO
    taylor_batches: int = 4
    min_widths: Tuple[Tuple[str, int], ...] = ()  # (conv name, channels): floors no round prunes below

    def check(self) -> None:
        if not 0.0 < self.target_ratio < 1.0:
            raise ConfigError(f"target ratio must be in (0, 1), got {self.target_ratio}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.finetune_steps < 0:
            raise ConfigError(f"fine-tune steps must be 0 or more, got {self.finetune_steps}")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be at least 1, got {self.round_to}")
        if self.taylor_batches < 1:
            raise ConfigError(f"taylor batches must be at least 1, got {self.taylor_batches}")
        make_importance(self.criterion)
        names = [name for name, _ in self.min_widths]
        if len(set(names)) != len(names):
            raise ConfigError(f"a conv has two floors: {names}")


@dataclass(frozen=True)
class RoundResult:
    round: int
    parameters: int
    macs: int  # at the deployment input size
    parameter_ratio: float
    mac_ratio: float
    val_loss_pruned: float  # right after the cut (NaN when resumed past it or without validation data)
    val_loss_finetuned: float


def _round_done(path: Path, steps: int) -> bool:
    if not path.is_file():
        return False
    return int(torch.load(path, map_location="cpu", weights_only=True).get("step", -1)) >= steps


def iterative_prune(teacher: CenterNetUNet, specs: ModelSpecs, sampler: CropSampler,
                    val_sampler: Optional[CropSampler], cfg: PruneConfig, train_cfg: TrainConfig, out_dir,
                    teacher_path: str = "", progress: bool = True, resume: bool = False) -> Path:
    """Prune ``teacher`` in ``cfg.rounds`` rounds with fine-tuning; writes ``out_dir/pruned.pt`` and returns its path.

    Round k works in ``out_dir/round<k>`` (Trainer checkpoints); with ``resume``
    finished rounds are loaded and an interrupted fine-tune continues from its
    ``last.pt``. ``train_cfg.steps`` is ignored (``cfg.finetune_steps`` per round).
    """
    cfg.check()
    check_min_widths(teacher, dict(cfg.min_widths), cfg.round_to)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deploy_shape = (specs.preprocess.channels, specs.preprocess.out_height, specs.preprocess.out_width)
    shape = example_shape(teacher)
    reference = model_cost(teacher, shape)
    reference_deploy = model_cost(teacher, deploy_shape)
    model = rebuild(teacher)
    results: List[RoundResult] = []
    for k, budget in enumerate(round_budgets(reference, cfg.target_ratio, cfg.rounds), start=1):
        round_dir = out / f"round{k}"
        last = round_dir / "last.pt"
        card = {"name": f"pruned-round{k}", "teacher": str(teacher_path), "pruning": asdict(cfg), "round": k}
        round_cfg = replace(train_cfg, steps=cfg.finetune_steps, seed=train_cfg.seed + k)
        if resume and _round_done(last, cfg.finetune_steps):
            model, _ = load_checkpoint(last)
            print(f"round {k}: loaded {last}", flush=True)
            trainer = Trainer(model.train(), sampler, val_sampler, round_cfg, round_dir, {}, progress=False)
            pruned_loss = float("nan")
        else:
            if resume and last.is_file():
                model, _ = load_checkpoint(last)  # the architecture of the interrupted round
            else:
                if cfg.criterion == "taylor":
                    accumulate_gradients(model, sampler, cfg.taylor_batches, train_cfg.batch_size, train_cfg.seed + k)
                model = prune_to_budget(model, budget, cfg.criterion, cfg.round_to, dict(cfg.min_widths))
            model.train()
            extra = checkpoint_extra(model, specs, card)
            trainer = Trainer(model, sampler, val_sampler, round_cfg, round_dir, extra, progress=progress)
            if resume and last.is_file():
                trainer.resume(last)
                print(f"round {k}: resumed fine-tuning at step {trainer.step}", flush=True)
            pruned_loss = trainer.validate() if trainer.step == 0 else float("nan")
            if cfg.finetune_steps:
                trainer.fit()
            else:
                trainer.save("last.pt")
        cost = model_cost(model, deploy_shape)
        ratio = cost.ratio_to(reference_deploy)
        results.append(RoundResult(k, cost.parameters, cost.macs, ratio.parameters, ratio.macs, pruned_loss,
                                   trainer.validate()))
        print(f"round {k}: {cost.parameters:,} parameters ({ratio.parameters:.1%}), {cost.macs / 1e9:.3f} GMACs "
              f"({ratio.macs:.1%}), val loss {pruned_loss:.4f} after the cut, {results[-1].val_loss_finetuned:.4f} "
              f"after fine-tuning", flush=True)
    final = results[-1]
    card = {"name": "pruned", "teacher": str(teacher_path), "pruning": asdict(cfg), "parameters": final.parameters,
            "macs": final.macs, "parameter_ratio": final.parameter_ratio, "mac_ratio": final.mac_ratio}
    path = out / "pruned.pt"
    save_checkpoint(path, model.eval(), specs, card)
    rounds = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
              for r in results]  # strict JSON: no NaN
    summary = {"teacher": {"parameters": reference_deploy.parameters, "macs": reference_deploy.macs},
               "rounds": rounds, "arch": arch_of(model), "config": asdict(cfg)}
    (out / "prune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return path


def prune_checkpoint(teacher_path, data_dir, out_dir, cfg: PruneConfig, train_cfg: TrainConfig,
                     progress: bool = True, resume: bool = False) -> Path:
    """:func:`iterative_prune` from files: the teacher checkpoint and a dataset folder (train/ and val/ splits)."""
    from toolchain.training.run import build_samplers

    cfg.check()
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    teacher, specs = load_checkpoint(teacher_path)
    check_min_widths(teacher, dict(cfg.min_widths), cfg.round_to)  # before the data is read
    sampler, val_sampler = build_samplers(data_dir, specs.preprocess, specs.decode.stride)
    return iterative_prune(teacher, specs, sampler, val_sampler, cfg, train_cfg, out_dir,
                           teacher_path=str(teacher_path), progress=progress, resume=resume)
