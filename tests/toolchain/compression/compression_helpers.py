"""Tiny synthetic data and models for the compression tests (no DICOM: cached planes made here)."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from edge.decode.spec import DecodeSpec
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec
from toolchain.models.centernet_unet import CenterNetUNet
from toolchain.training.sampling import AugmentConfig, CropSampler
from toolchain.training.slice_cache import CachedSeries
from toolchain.training.trainer import TrainConfig

SIZE = 64
ROOT = Path(__file__).resolve().parents[3]
TEACHER_WIDTHS = (16, 24, 32)


def synthetic_series(seed: int, n_slices: int = 7, side: int = 96) -> CachedSeries:
    """Noisy 'lung' planes with two bright spherical nodules, and their per-slice annotations."""
    rng = np.random.default_rng(seed)
    planes = rng.normal(0.2, 0.03, (n_slices, 1, side, side)).astype(np.float32)
    yy, xx = np.mgrid[0:side, 0:side]
    nodules = [[] for _ in range(n_slices)]
    for _ in range(2):
        cy, cx = rng.uniform(20, side - 20, 2)
        cz, radius = n_slices / 2 + rng.uniform(-1, 1), rng.uniform(4, 7)
        for k in range(n_slices):
            frac = abs(k - cz) / (radius / 2)  # slices 2 px apart
            if frac > 1.0:
                continue
            r_k = radius * np.sqrt(max(0.0, 1 - frac ** 2))
            planes[k, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r_k ** 2] = 0.9
            nodules[k].append((float(cy), float(cx), 2 * radius, float(frac)))
    return CachedSeries(f"1.2.3.{seed}", planes.astype(np.float16), np.arange(n_slices) * 2.0, 2.0, nodules)


def make_sampler(seed: int = 0) -> CropSampler:
    return CropSampler([synthetic_series(seed), synthetic_series(seed + 1)], slices=3, stride=2, fill_value=0.0,
                       cfg=AugmentConfig(crop=SIZE))


def recording_build_samplers(cfgs: list):
    """A stand-in for ``toolchain.training.run.build_samplers``: synthetic crops whatever the folder; each
    call's AugmentConfig is appended to ``cfgs`` (and its hard negatives, when given, as a (rows, source) pair)."""

    def build_samplers(data_dir, spec, stride, cfg=None, workers=1, hard_negatives=None,
                       hard_negatives_source="hard negatives"):
        cfgs.append(cfg)
        if hard_negatives is not None:
            cfgs.append((hard_negatives, hard_negatives_source))
        return make_sampler(0), None

    return build_samplers


def tiny_specs() -> ModelSpecs:
    return ModelSpecs(PreprocessSpec(out_height=SIZE, out_width=SIZE, slices=3), DecodeSpec(stride=2),
                      {"name": "tiny"})


def tiny_teacher(seed: int = 0, widths=TEACHER_WIDTHS, head_width: int = 16) -> CenterNetUNet:
    torch.manual_seed(seed)
    return CenterNetUNet(3, widths, head_width)


def tiny_train_config(steps: int, **kw) -> TrainConfig:
    kw = dict(dict(steps=steps, batch_size=2, lr=2e-3, warmup_steps=1, checkpoint_every=2, val_every=2,
                   val_batches=1), **kw)
    return TrainConfig(**kw)


class Interrupted(Exception):
    pass


class InterruptingSampler:
    """Fails after ``calls`` crops, as a killed run would stop mid-training."""

    def __init__(self, sampler, calls):
        self.sampler, self.calls = sampler, calls

    def sample(self, rng):
        if self.calls == 0:
            raise Interrupted("stopped after the given number of crops")
        self.calls -= 1
        return self.sampler.sample(rng)


def load_tool(name):
    """A script of tools/ as a module (its ``main(argv)`` is the CLI)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
