"""Every calibration step in order: slices -> network inputs -> histograms -> ranges -> Q/DQ ONNX, cache, check.

Files written to ``out_dir`` (``<stem>`` is the FP32 model's file stem):

==================================  ==========================================================
``calibration_manifest.json``       the chosen slices and why (:mod:`calib.selection`)
``<stem>.histograms.npz``           ``|x|`` histograms of every activation (any method from them)
``<stem>.<method>.ranges.json``     per-tensor ``amax``
``<stem>.int8.qdq.onnx``            Q/DQ model, TensorRT placement (what engines are built from)
``<stem>.int8.cpu.onnx``            the same scales, ONNX Runtime CPU placement (same outputs)
``<stem>.trt-<ver>.calib.cache``    TensorRT calibration cache (implicit INT8, DLA)
``<stem>.qdq_check.txt``            the checker's report on both Q/DQ models
==================================  ==========================================================
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import numpy as np

from calib.data_loader import CalibrationDataLoader
from calib.qdq import quantize_model, write_model
from calib.qdq_check import QdqReport, check_qdq
from calib.ranges import (
    DEFAULT_METHOD,
    DEFAULT_PERCENTILE,
    ActivationCollector,
    TensorHistogram,
    compute_ranges,
    head_tensors,
    save_histograms,
    scale_from_amax,
    write_ranges,
)
from calib.selection import SelectionSettings, scan_pool, select_slices, write_manifest
from calib.trt_cache import trt_version_number, write_calibration_cache
from edge.engine_manifest import file_sha256
from edge.errors import EdgeError

MANIFEST_NAME = "calibration_manifest.json"


class QdqCheckError(EdgeError):
    """A generated Q/DQ model breaks one of TensorRT's rules (a bug here, or an unsupported model)."""


@dataclass(frozen=True)
class CalibrationSettings:
    n: int = 300
    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    seed: int = 0
    batch_size: int = 8
    trt_version: str = "10.3"


@dataclass
class CalibrationArtifacts:
    manifest: Path
    histograms: Path
    ranges: Path
    qdq_onnx: Path
    cpu_onnx: Path
    cache: Path
    check_file: Path
    checks: Dict[str, QdqReport]
    calibration_sha256: str
    n_slices: int
    n_strata: int
    method: str


def artifact_paths(out_dir, stem: str, method: str, trt_version: str) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "manifest": out_dir / MANIFEST_NAME,
        "histograms": out_dir / f"{stem}.histograms.npz",
        "ranges": out_dir / f"{stem}.{method}.ranges.json",
        "qdq_onnx": out_dir / f"{stem}.int8.qdq.onnx",
        "cpu_onnx": out_dir / f"{stem}.int8.cpu.onnx",
        "cache": out_dir / f"{stem}.trt-{trt_version_number(trt_version)}.calib.cache",
        "check_file": out_dir / f"{stem}.qdq_check.txt",
    }


class _HashingBatches:
    """``loader.batches`` that hashes the inputs of its first pass (the collector makes two)."""

    def __init__(self, loader: CalibrationDataLoader):
        self.loader = loader
        self.digest = hashlib.sha256()
        self.passes = 0

    def __call__(self) -> Iterator[np.ndarray]:
        first = self.passes == 0
        self.passes += 1
        for batch in self.loader.batches():
            if first:
                self.digest.update(np.ascontiguousarray(batch).tobytes())
            yield batch


def collect_histograms(onnx_path, manifest_path, batch_size: int = 8, limit: Optional[int] = None):
    """(histograms, sha256 of the calibration inputs, number of slices) for one model and manifest."""
    loader = CalibrationDataLoader.for_model(onnx_path, manifest_path, batch_size=batch_size, limit=limit)
    batches = _HashingBatches(loader)
    histograms = ActivationCollector(onnx_path).collect(batches)
    return histograms, batches.digest.hexdigest(), loader.n_slices


def quantize_from_histograms(onnx_path, histograms: Dict[str, TensorHistogram], method: str, percentile: float,
                             info: dict):
    """(amax, TensorRT-layout QdqModel, CPU-layout QdqModel, reports) for one method."""
    import onnx

    model = onnx.load(str(onnx_path))
    keep_max = head_tensors(model)
    amax = compute_ranges(histograms, method, percentile, keep_max)
    info = dict(info, method=method, **({"percentile": percentile} if method == "percentile" else {}))
    if method != "max" and keep_max:
        info["max_range_tensors"] = keep_max
    trt_model = quantize_model(model, amax, "tensorrt", info)
    cpu_model = quantize_model(model, amax, "cpu", info)
    # Only the TensorRT layout is for TensorRT (the CPU one has uint8 activations, which TensorRT refuses).
    reports = {"tensorrt": check_qdq(trt_model.model)}
    if not reports["tensorrt"].ok:
        raise QdqCheckError("generated Q/DQ model breaks TensorRT's rules: " + reports["tensorrt"].format())
    return amax, trt_model, cpu_model, reports


def calibrate(onnx_path, pool_dir, out_dir, settings: CalibrationSettings = CalibrationSettings(),
              annotations=None, log: Callable[[str], None] = print) -> CalibrationArtifacts:
    """Run every step before the TensorRT build; see the module docstring for the files."""
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = artifact_paths(out_dir, onnx_path.stem, settings.method, settings.trt_version)

    pool = scan_pool(pool_dir, annotations)
    manifest = select_slices(pool, SelectionSettings(n=settings.n, seed=settings.seed))
    write_manifest(paths["manifest"], manifest)
    n_strata = sum(1 for s in manifest["strata"] if s["quota"])
    log(f"selected {manifest['selected']} calibration slice(s) from {pool.n_slices} in {len(pool.series)} series "
        f"({n_strata} strata) -> {paths['manifest']}")

    histograms, cal_sha, n_slices = collect_histograms(onnx_path, paths["manifest"], settings.batch_size)
    save_histograms(paths["histograms"], histograms)
    info = {"calibration_sha256": cal_sha, "calibration_slices": n_slices,
            "source_onnx_sha256": file_sha256(onnx_path), "calibration_manifest": paths["manifest"].name}
    amax, trt_model, cpu_model, reports = quantize_from_histograms(onnx_path, histograms, settings.method,
                                                                    settings.percentile, info)
    write_ranges(paths["ranges"], amax, settings.method, settings.percentile, extra={"info": info})
    write_model(paths["qdq_onnx"], trt_model.model)
    write_model(paths["cpu_onnx"], cpu_model.model)
    scales = {name: scale_from_amax(a) for name, a in amax.items()}
    write_calibration_cache(paths["cache"], scales, settings.trt_version)
    paths["check_file"].write_text("\n".join(f"[{k} layout] {r.format()}" for k, r in reports.items()) + "\n")
    log(f"ranges ({settings.method}) of {len(amax)} tensor(s) from {n_slices} slice(s) -> {paths['ranges']}")
    log(f"Q/DQ ONNX: {paths['qdq_onnx']} (TensorRT placement), {paths['cpu_onnx']} (ONNX Runtime CPU placement)")
    log(f"[tensorrt layout] {reports['tensorrt'].summary()}")
    log(f"calibration cache (TensorRT {settings.trt_version}): {paths['cache']}")
    return CalibrationArtifacts(paths["manifest"], paths["histograms"], paths["ranges"], paths["qdq_onnx"],
                                paths["cpu_onnx"], paths["cache"], paths["check_file"], reports, cal_sha,
                                n_slices, n_strata, settings.method)
