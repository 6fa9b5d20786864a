"""Helpers for the update tests: tiny exported detectors, golden vectors, keys, bundles, installers.

The models are the toolchain's CenterNetUNet at 32x32 (exported once per
session); their heatmap head is scaled so that the decode finds peaks, which
makes the golden check's finding comparison non-vacuous.
"""

import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from edge.decode.spec import DecodeSpec
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec

SIZE = 32
TOLERANCES = {"score_atol": 0.005, "heatmap_atol": 0.01}
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def tiny_specs() -> ModelSpecs:
    return ModelSpecs(PreprocessSpec(out_height=SIZE, out_width=SIZE, slices=3),
                      DecodeSpec(stride=2, score_threshold=0.4, max_detections_per_slice=32),
                      {"name": "tiny-detector"})


def export_tiny(path: Path, seed: int) -> Path:
    import torch

    from toolchain.export.onnx_export import export_onnx
    from toolchain.models.centernet_unet import CenterNetUNet

    torch.manual_seed(seed)
    model = CenterNetUNet(3, [8, 16], 8).eval()
    with torch.no_grad():
        model.heatmap.out.bias.fill_(0.0)
        model.heatmap.out.weight.mul_(20.0)
    export_onnx(model, tiny_specs(), path)
    return path


def golden_inputs(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def make_golden_file(model: Path, path: Path, n: int = 2) -> Path:
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
    from edge.update.golden import make_golden

    with OnnxRuntimeRunner(model) as runner:
        make_golden(runner, tiny_specs().decode, golden_inputs(n)).save(path)
    return path


def build_bundle(out: Path, models, key, release: int, version: str = None, model="a", golden=None,
                 **kwargs) -> Path:
    """A bundle of tiny model ``model`` (golden vectors of model ``golden`` or its own), made on NOW."""
    from edge.update.packaging import package_bundle

    onnx, own_golden = models[model]
    golden_path = models[golden][1] if golden else own_golden
    kwargs.setdefault("tolerances", TOLERANCES)
    kwargs.setdefault("now", NOW - timedelta(days=1))
    package_bundle(out, onnx, key, version or f"1.{release}.0", release, golden=golden_path,
                   self_check=golden is None, **kwargs)
    return out


def make_state(root: Path, *keys) -> Path:
    from edge.update.signing import TrustStore

    root.mkdir(parents=True, exist_ok=True)
    TrustStore({k.key_id: k.public_key for k in keys}).save(root / "trusted_keys.json")
    return root


def cpu_device():
    from edge.update.device import DeviceProfile

    return DeviceProfile("0.1.0", ("cpu",), None)


def installer(root: Path, **kwargs):
    from edge.update.installer import Installer

    kwargs.setdefault("device", cpu_device())
    kwargs.setdefault("now", lambda: NOW)
    return Installer(root, **kwargs)


def subprocess_env() -> dict:
    """Environment for a child interpreter that sees the same packages as this one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
