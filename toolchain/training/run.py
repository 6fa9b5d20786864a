"""Train a detector end to end from a dataset folder: cache -> sampler -> trainer."""

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from edge.errors import ConfigError, InputError
from edge.preprocess.reference import window_to_unit_range
from toolchain.models.centernet_unet import build_model, count_parameters
from toolchain.training.hard_negatives import HardNegative, check_hard_negative_settings, index_hard_negatives
from toolchain.training.recipes import DEFAULT_DECODE, DEFAULT_PREPROCESS, TEACHER_ARCH
from toolchain.training.sampling import AugmentConfig, CropSampler
from toolchain.training.slice_cache import cache_split
from toolchain.training.trainer import TrainConfig, Trainer


def _fill_value(spec) -> float:
    return float(window_to_unit_range(spec.fill_hu, spec.windows[0]))


def build_samplers(data_dir, spec, stride: int, cfg: Optional[AugmentConfig] = None, workers: int = 1,
                   hard_negatives: Optional[Sequence[HardNegative]] = None, hard_negatives_source="hard negatives"):
    """Training and validation crop samplers from a dataset folder (``workers``: decoding processes).

    ``hard_negatives``: rows read from ``hard_negatives_source`` (a CSV from
    ``tools/mine_hard_negatives.py``); those on the training series are where
    ``cfg.hard_negative_fraction`` of the negative crops centre.
    """
    cfg = cfg or AugmentConfig()
    check_hard_negative_settings(hard_negatives is not None, cfg.hard_negative_fraction)
    data_dir = Path(data_dir)
    if workers < 1:
        raise ConfigError(f"cache workers must be >= 1 (got {workers})")
    for split in ("train", "val"):
        if not (data_dir / split / "annotations.csv").is_file():
            raise InputError(data_dir / split, "missing split (expected annotations.csv from tools/make_dataset.py)")
    t0 = time.time()
    train = cache_split(data_dir / "train", spec, workers)
    val = cache_split(data_dir / "val", spec, workers)
    if not train:
        raise InputError(data_dir / "train", "no usable series")
    print(f"cached {len(train)} train / {len(val)} val series "
          f"({sum(len(s.planes) for s in train)} slices) in {time.time() - t0:.0f} s", flush=True)
    hard = []
    if hard_negatives is not None:
        hard = index_hard_negatives(hard_negatives, train, hard_negatives_source)
        if not hard:
            raise InputError(Path(str(hard_negatives_source)), f"none of its rows is on a series of "
                                                               f"{data_dir / 'train'} (mined on another dataset?)")
        print(f"hard negatives: {len(hard)} on {len({h[0] for h in hard})} training series", flush=True)
    fill = _fill_value(spec)
    return (CropSampler(train, spec.slices, stride, fill, cfg, hard),
            CropSampler(val, spec.slices, stride, fill, AugmentConfig(crop=cfg.crop)) if val else None)


def load_initial_weights(model: torch.nn.Module, path) -> None:
    """Copy a training checkpoint's weights into ``model``; InputError when the file or architecture differs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "initial checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:  # torch.load raises many unrelated types (pickle, zip, EOF, runtime) for bad files
        raise InputError(path, f"not a training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise InputError(path, f"checkpoint does not fit the architecture: {str(e).splitlines()[0]}") from None


def train_detector(data_dir, out_dir, arch=None, steps=3000, batch_size=16, lr=2e-3, seed=0, threads=0,
                   resume=False, progress=True, name="teacher", init=None, positive_sampling="slice",
                   device="cpu", time_budget_s=0.0, cache_workers=1) -> Path:
    """Train a detector; ``init`` starts from a checkpoint's weights (same architecture) with a fresh schedule.

    ``positive_sampling`` is :class:`AugmentConfig`'s: "slice", "nodule" (small nodules as often as large ones) or "small".
    ``device``, ``time_budget_s``: :class:`TrainConfig`'s; ``cache_workers``: processes decoding the series.
    """
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads, device=device,
                      time_budget_s=time_budget_s)
    cfg.check()
    arch = dict(arch or TEACHER_ARCH)
    spec, decode = DEFAULT_PREPROCESS, DEFAULT_DECODE
    torch.manual_seed(seed)
    model = build_model(arch)
    if init is not None:
        load_initial_weights(model, init)
    sampler, val_sampler = build_samplers(data_dir, spec, decode.stride,
                                          AugmentConfig(positive_sampling=positive_sampling), cache_workers)
    extra = {
        "arch": arch,
        "preprocess": spec.to_dict(),
        "decode": decode.to_dict(),
        "card": {"name": name, "parameters": count_parameters(model), "data": str(data_dir), "seed": seed,
                 "init": str(init) if init is not None else None, "positive_sampling": positive_sampling,
                 "device": device},
    }
    trainer = Trainer(model, sampler, val_sampler, cfg, out_dir, extra, progress=progress)
    last = Path(out_dir) / "last.pt"
    if resume and last.is_file():
        trainer.resume(last)
        print(f"resumed at step {trainer.step}", flush=True)
    trainer.fit()
    best = Path(out_dir) / "best.pt"
    return best if best.is_file() else last
