"""Does the exported ONNX model compute what the PyTorch model computes?

Both run on the same network inputs: ONNX Runtime on the CPU through the
runtime's own runner (:class:`edge.backends.onnxruntime_runner.OnnxRuntimeRunner`,
all graph optimizations on) and PyTorch in eval mode with the deployment head
(:class:`ExportWrapper`). The inputs should be real CT slices preprocessed by the
runtime path (:class:`edge.preprocess.cpu.CpuPreprocessor`), since random noise
never exercises the value ranges the model sees.
"""

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
from edge.detector import order_slices
from edge.dicom import read_frames
from edge.errors import DicomError, EdgeError, InputError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess.cpu import CpuPreprocessor, iter_network_inputs
from edge.preprocess.spec import PreprocessSpec
from toolchain.models.centernet_unet import OUTPUT_NAMES, ExportWrapper

DEFAULT_TOLERANCE = 1e-4  # max abs difference allowed on any output element
DEFAULT_PARITY_INPUTS = 4


class ParityError(EdgeError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ParityStats:
    """Per-output max abs difference (ONNX Runtime vs PyTorch) and max abs PyTorch value, over ``batch`` inputs."""

    max_abs_diff: Dict[str, float]
    max_abs_reference: Dict[str, float]
    batch: int

    @property
    def worst(self) -> Tuple[str, float]:
        """The output with the largest difference (NaN counts as the largest)."""
        return max(self.max_abs_diff.items(), key=lambda kv: math.inf if math.isnan(kv[1]) else kv[1])

    def within(self, tolerance: float) -> bool:
        return all(d <= tolerance for d in self.max_abs_diff.values())  # False for NaN

    def format(self) -> str:
        return ", ".join(
            f"{name} {d:.2e} (|max| {self.max_abs_reference[name]:.3g})" for name, d in self.max_abs_diff.items()
        )


def _torch_outputs(model: torch.nn.Module, inputs: np.ndarray) -> List[np.ndarray]:
    was_training = model.training
    wrapper = ExportWrapper(model).eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            outs = wrapper(torch.from_numpy(inputs).to(device))
    finally:
        model.train(was_training)
    return [o.float().cpu().numpy() for o in outs]


def check_parity(model: torch.nn.Module, onnx_path, inputs: np.ndarray) -> ParityStats:
    """Run ``inputs`` (N, C, H, W) as one batch through both models and compare every output."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be (N, C, H, W), got shape {inputs.shape}")
    reference = _torch_outputs(model, inputs)
    with OnnxRuntimeRunner(onnx_path) as runner:
        input_name = next(iter(runner.input_metadata()))
        got = runner.infer({input_name: inputs})
    missing = [n for n in OUTPUT_NAMES if n not in got]
    if missing:
        raise InputError(onnx_path, f"model lacks output(s) {', '.join(missing)}")
    diff, ref_max = {}, {}
    for name, ref in zip(OUTPUT_NAMES, reference):
        out = got[name]
        if out.shape != ref.shape:
            raise InputError(onnx_path, f"output {name!r} has shape {out.shape}, PyTorch gives {ref.shape}")
        diff[name] = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
        ref_max[name] = float(np.max(np.abs(ref))) if ref.size else 0.0
    return ParityStats(diff, ref_max, inputs.shape[0])


def require_parity(stats: ParityStats, onnx_path, tolerance: float = DEFAULT_TOLERANCE) -> None:
    """Raise ParityError naming the worst output when any difference exceeds ``tolerance``."""
    if not stats.within(tolerance):
        name, d = stats.worst
        raise ParityError(
            f"{onnx_path}: ONNX Runtime and PyTorch outputs differ: {name} max abs diff {d:.3g} > {tolerance:g} "
            f"over {stats.batch} input(s) ({stats.format()})"
        )


def network_inputs(frames: Sequence[CTFrame], spec: PreprocessSpec, count: int = DEFAULT_PARITY_INPUTS) -> np.ndarray:
    """``count`` network inputs (count, C, H, W) float32, centred on evenly spaced slices of an ordered series.

    Built exactly as the runtime builds them (CPU preprocessing, 2.5D stacking,
    end slices repeated).
    """
    if not frames:
        raise ValueError("no frames to build parity inputs from")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    centres = sorted(set(np.linspace(0, len(frames) - 1, count).round().astype(int).tolist()))
    picked = [x[0].astype(np.float32) for i, x in enumerate(iter_network_inputs(frames, CpuPreprocessor(spec)))
              if i in centres]
    return np.stack(picked)


def read_series(folder) -> List[CTFrame]:
    """The CT frames of the one series in ``folder`` (its files, not subfolders), ordered along the slice normal.

    Files that are not DICOM CT are skipped; InputError when no CT frame is left
    or the folder holds more than one series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder of DICOM files")
    by_series = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            frames = read_frames(path)
        except DicomError:
            continue
        for f in frames:
            if not f.is_localizer:
                by_series[f.series_uid].append(f)
    if not by_series:
        raise InputError(folder, "holds no readable CT image")
    if len(by_series) > 1:
        raise InputError(folder, f"holds {len(by_series)} series; point it at a folder with one")
    return order_slices(next(iter(by_series.values())))


def synthetic_series(n_slices: int = 9, size: int = 512, spacing_mm: float = 0.7, slice_mm: float = 2.5,
                     seed: int = 0) -> List[CTFrame]:
    """A small chest-like CT series: body, lungs, vessels, spine, nodules, noise, padded field of view.

    Stored as int16 with slope 1, intercept -1024 and padding -2000, like most
    scanners, so parity inputs span the real HU range and the padding path.
    """
    rng = np.random.default_rng(seed)
    axis = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    ys, xs = axis[:, None], axis[None, :]
    half = size * spacing_mm / 2.0
    nodules = [(rng.uniform(-0.5, 0.5) * half + side * 0.45 * half, rng.uniform(-0.3, 0.2) * half,
                rng.uniform(-2.0, 2.0) * slice_mm, rng.uniform(3.0, 8.0)) for side in (-1, 1, 1)]
    vessels = [(rng.uniform(-0.7, 0.7) * half, rng.uniform(-0.4, 0.3) * half, rng.uniform(1.0, 3.0)) for _ in range(24)]
    frames = []
    for k in range(n_slices):
        z = (k - (n_slices - 1) / 2.0) * slice_mm
        hu = np.full((size, size), -1000.0)
        hu[((xs / (0.85 * half)) ** 2 + (ys / (0.62 * half)) ** 2) <= 1.0] = 40.0
        for side in (-1, 1):
            lung = ((xs - side * 0.4 * half) / (0.3 * half)) ** 2 + ((ys + 0.05 * half) / (0.45 * half)) ** 2 <= 1.0
            hu[lung] = -860.0
        hu[(xs ** 2 + (ys - 0.45 * half) ** 2) <= (0.08 * half) ** 2] = 700.0  # vertebra
        for vx, vy, r in vessels:
            vessel = ((xs - vx) ** 2 + (ys - vy) ** 2 <= r ** 2) & (hu < -500)
            hu[vessel] = 30.0
        for nx, ny, nz, r in nodules:
            r_slice = r ** 2 - (z - nz) ** 2
            if r_slice > 0:
                hu[(xs - nx) ** 2 + (ys - ny) ** 2 <= r_slice] = 20.0
        hu += rng.normal(0.0, 15.0, hu.shape)
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.int16)
        stored[xs ** 2 + ys ** 2 > (0.98 * half) ** 2] = -2000  # outside the reconstruction circle
        corner = -half + spacing_mm / 2
        geometry = SliceGeometry(size, size, (spacing_mm, spacing_mm), (corner, corner, z), slice_thickness=slice_mm)
        frames.append(CTFrame(stored, 1.0, -1024.0, geometry, padding=(-2000, -2000), series_uid="synthetic",
                              instance_number=k + 1, source=f"<synthetic slice {k + 1}>"))
    return frames


def parity_frames(series_dir: Optional[str] = None) -> Tuple[List[CTFrame], str]:
    """The series parity runs on and a description of it: ``series_dir``'s DICOM files, else a synthetic chest.

    Switch point: once :mod:`edge.phantom` offers ``generate_series``, its phantom
    replaces :func:`synthetic_series` here.
    """
    if series_dir is not None:
        return read_series(series_dir), f"series {series_dir}"
    return synthetic_series(), "synthetic chest series"
