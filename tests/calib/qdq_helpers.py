"""The tiny detector the Q/DQ tests quantize: exported as the real export path does, with phantom-free inputs."""

import numpy as np
import onnx
import torch

from edge.decode.spec import DecodeSpec
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec
from toolchain.export.onnx_export import export_onnx
from toolchain.models.centernet_unet import CenterNetUNet


def export_tiny_detector(path, size: int, seed: int, name: str):
    """(ONNX model, specs) of a CenterNetUNet(3, [8, 16], 8) with seeded weights, exported to ``path``."""
    torch.manual_seed(seed)
    model = CenterNetUNet(3, [8, 16], 8).eval()
    specs = ModelSpecs(PreprocessSpec(out_height=size, out_width=size, slices=3), DecodeSpec(stride=2), {"name": name})
    export_onnx(model, specs, path)
    return onnx.load(str(path)), specs


def tiny_inputs(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` network inputs, uniform over [-0.2, 1.2] (a little beyond the normalised window)."""
    return np.random.default_rng(seed).uniform(-0.2, 1.2, (n, 3, size, size)).astype(np.float32)
