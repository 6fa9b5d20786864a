"""The compression table: parameters, MACs, ONNX Runtime CPU latency and CPM per model, and the targets.

Every model is exported to ONNX (the deployment graph, :func:`export_onnx`)
and timed with ONNX Runtime on the CPU in one process, round-robin (one run of
each model in turn), so load changes on the machine hit all models alike.
CPM comes from evaluation JSONs (``tools/evaluate.py --out-json``).
"""

import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge.errors import ConfigError, InputError
from toolchain.compression.flops import model_cost
from toolchain.export.onnx_export import export_onnx, load_checkpoint

TARGET_COST_RATIO = 0.30  # student parameters and MACs, of the teacher's
TARGET_CPM_GAP = 0.02  # distilled student CPM at most this far below the teacher's
ROLE_TEACHER, ROLE_PRUNED, ROLE_DISTILLED, ROLE_SCRATCH = "teacher", "pruned", "distilled", "scratch"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # row label; the roles above enable the target checks
    checkpoint: str
    evaluation: Optional[str] = None  # evaluation JSON with "cpm"


@dataclass
class ReportRow:
    name: str
    checkpoint: str
    parameters: int
    macs: int
    latency_ms: float  # median
    latency_p90_ms: float
    cpm: Optional[float] = None
    cpm_ci: Optional[List[float]] = None
    parameter_ratio: float = 1.0  # of the teacher's (or the first row's)
    mac_ratio: float = 1.0


def read_cpm(path) -> Tuple[float, Optional[List[float]]]:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as e:
        raise InputError(path, f"cannot read the evaluation: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"not JSON: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("cpm"), (int, float)):
        raise InputError(path, "evaluation JSON has no numeric 'cpm' (write it with tools/evaluate.py --out-json)")
    ci = report.get("cpm_ci")
    return float(report["cpm"]), [float(v) for v in ci] if isinstance(ci, list) and len(ci) == 2 else None


def _session(path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_onnx_models(paths: Sequence, input_shape, threads: int = 1, runs: int = 30,
                     warmup: int = 3) -> List[List[float]]:
    """Per model, ``runs`` latencies in ms of one batch-1 inference, timed round-robin."""
    sessions = [_session(p, threads) for p in paths]
    x = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def build_rows(entries: Sequence[ModelEntry], threads: int = 1, runs: int = 30, warmup: int = 3,
               onnx_dir=None) -> List[ReportRow]:
    """Load, measure, export and time every entry (ONNX files go to ``onnx_dir`` or a temporary folder)."""
    if not entries:
        raise ConfigError("no models to report")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {', '.join(names)}")
    if runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError(f"need runs >= 1, warmup >= 0 and threads >= 1 (got {runs}, {warmup}, {threads})")
    with tempfile.TemporaryDirectory(prefix="compression-report-") as tmp:
        folder = Path(onnx_dir) if onnx_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        loaded, paths, shape = [], [], None
        for e in entries:
            model, specs = load_checkpoint(e.checkpoint)
            spec = specs.preprocess
            this_shape = (spec.channels, spec.out_height, spec.out_width)
            if shape is not None and this_shape != shape:
                raise ConfigError(f"{e.name} takes input {this_shape}, {entries[0].name} {shape}: not comparable")
            shape = this_shape
            path = folder / f"{e.name}.onnx"
            export_onnx(model, specs, path)
            loaded.append(model)
            paths.append(path)
        times = time_onnx_models(paths, shape, threads, runs, warmup)
    rows = []
    for e, model, t in zip(entries, loaded, times):
        cost = model_cost(model, shape)
        cpm, ci = read_cpm(e.evaluation) if e.evaluation else (None, None)
        rows.append(ReportRow(e.name, str(e.checkpoint), cost.parameters, cost.macs, statistics.median(t),
                              float(np.percentile(t, 90)), cpm, ci))
    reference = next((r for r in rows if r.name == ROLE_TEACHER), rows[0])
    for r in rows:
        r.parameter_ratio = r.parameters / reference.parameters
        r.mac_ratio = r.macs / reference.macs
    return rows


def check_targets(rows: Sequence[ReportRow]) -> Dict[str, Optional[bool]]:
    """The issue's targets (None where a needed row or CPM is missing)."""
    by = {r.name: r for r in rows}
    teacher, distilled, scratch = by.get(ROLE_TEACHER), by.get(ROLE_DISTILLED), by.get(ROLE_SCRATCH)
    out: Dict[str, Optional[bool]] = {}
    out[f"student parameters and MACs <= {TARGET_COST_RATIO:.0%} of the teacher's"] = (
        None if teacher is None or distilled is None
        else distilled.parameter_ratio <= TARGET_COST_RATIO and distilled.mac_ratio <= TARGET_COST_RATIO)
    have = teacher is not None and distilled is not None and teacher.cpm is not None and distilled.cpm is not None
    out[f"distilled CPM within {TARGET_CPM_GAP} of the teacher's"] = (
        teacher.cpm - distilled.cpm <= TARGET_CPM_GAP if have else None)
    have = distilled is not None and scratch is not None and distilled.cpm is not None and scratch.cpm is not None
    out["distilled CPM above the same architecture trained from scratch"] = (
        distilled.cpm > scratch.cpm if have else None)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_report(rows: Sequence[ReportRow], threads: int, runs: int) -> dict:
    import onnxruntime as ort

    return {
        "rows": [asdict(r) for r in rows],
        "targets": check_targets(rows),
        "latency": {"runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "threads": threads,
                    "runs": runs, "batch": 1, "cpu": cpu_name()},
    }


def _fmt_cpm(r: dict) -> str:
    if r["cpm"] is None:
        return "-"
    ci = f" [{r['cpm_ci'][0]:.3f}, {r['cpm_ci'][1]:.3f}]" if r.get("cpm_ci") else ""
    return f"{r['cpm']:.3f}{ci}"


def format_markdown(report: dict) -> str:
    lat = report["latency"]
    lines = [
        "| model | parameters | % teacher | GMACs | % teacher | ORT CPU latency ms (median / p90) | CPM |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['parameter_ratio']:.1%} | {r['macs'] / 1e9:.3f} | "
                     f"{r['mac_ratio']:.1%} | {r['latency_ms']:.1f} / {r['latency_p90_ms']:.1f} | {_fmt_cpm(r)} |")
    lines += ["", f"Latency: {lat['runtime']}, {lat['threads']} thread(s), batch {lat['batch']}, "
              f"{lat['runs']} runs round-robin, CPU {lat['cpu']}.", ""]
    for name, ok in report["targets"].items():
        lines.append(f"- {name}: {'met' if ok else 'not met' if ok is not None else 'n/a'}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path, md_path) -> None:
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (md_path, format_markdown(report))):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as e:
            raise InputError(path, f"cannot write the report: {e.strerror or e}") from None
