"""CPM of the INT8 model per calibration method and per calibration-set size, next to the FP32 model's.

For each size the slices are chosen again from the pool (same seed) and the
activation histograms collected once; every method reads those histograms.
The INT8 models are the CPU-placement Q/DQ models (same outputs as the
TensorRT placement, faster on ONNX Runtime), evaluated by the runtime's
detector on an annotated folder of series with the LUNA16 CPM.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from calib.accuracy import cpm_of_model
from calib.pipeline import collect_histograms, quantize_from_histograms
from calib.qdq import write_model
from calib.ranges import DEFAULT_PERCENTILE
from calib.selection import SelectionSettings, scan_pool, select_slices, write_manifest
from edge.engine_manifest import file_sha256


@dataclass(frozen=True)
class SweepRow:
    method: str  # "fp32" for the reference
    calibration_slices: Optional[int]
    cpm: float
    scans: int

    def delta(self, reference: float) -> float:
        return self.cpm - reference


def cpm_sweep(onnx_path, pool_dir, data_dir, annotations, methods: Sequence[str], sizes: Sequence[int], out_dir,
              seed: int = 0, percentile: float = DEFAULT_PERCENTILE,
              log: Callable[[str], None] = print, qdq_as_written: bool = False) -> List[SweepRow]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpm, scans = cpm_of_model(onnx_path, data_dir, annotations)
    rows = [SweepRow("fp32", None, cpm, scans)]
    log(f"fp32: CPM {cpm:.4f} on {scans} scan(s)")
    pool = scan_pool(pool_dir)
    for n in sizes:
        manifest = write_manifest(out_dir / f"sweep_manifest_{n}.json",
                                  select_slices(pool, SelectionSettings(n=n, seed=seed)))
        histograms, cal_sha, n_slices = collect_histograms(onnx_path, manifest)
        info = {"calibration_sha256": cal_sha, "calibration_slices": n_slices,
                "source_onnx_sha256": file_sha256(onnx_path)}
        for method in methods:
            _, _, cpu_model, _ = quantize_from_histograms(onnx_path, histograms, method, percentile, info)
            path = out_dir / f"{Path(onnx_path).stem}.{method}.{n}.int8.cpu.onnx"
            write_model(path, cpu_model.model)
            cpm, scans = cpm_of_model(path, data_dir, annotations, qdq_as_written=qdq_as_written)
            rows.append(SweepRow(method, n_slices, cpm, scans))
            log(f"{method} on {n_slices} slice(s): CPM {cpm:.4f} ({cpm - rows[0].cpm:+.4f} vs fp32)")
    return rows


def format_table(rows: Sequence[SweepRow]) -> str:
    reference = rows[0].cpm
    lines = ["| model | calibration slices | CPM | vs FP32 |", "|---|---:|---:|---:|"]
    for r in rows:
        n = "" if r.calibration_slices is None else str(r.calibration_slices)
        lines.append(f"| {r.method} | {n} | {r.cpm:.4f} | {r.delta(reference):+.4f} |")
    return "\n".join(lines)
