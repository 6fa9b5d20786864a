"""End-to-end CPU throughput: our runtime path vs the naive pipeline, side by side in one run.

The same phantom DICOM series (written to a temporary folder) go through:

* naive -- what the source article sketches, per slice: ``pydicom.dcmread(path).pixel_array``,
  min-max normalisation to [0, 1], ``torch.nn.functional.interpolate`` (bilinear) to the
  model input, the slice repeated over the input channels, one eager PyTorch forward
  (batch 1, ``torch.no_grad``, fp32) of the teacher architecture, sigmoid and a 0.5
  threshold on the heatmap;
* ours -- what ``edge detect --workers 2`` runs (:func:`edge.offline.detect_folder`): header
  scan and grouping by series, ``edge.dicom`` decode, :class:`~edge.preprocess.cpu.CpuPreprocessor`,
  :class:`~edge.ingest.streaming.StreamingSeriesDetector` over
  :class:`~edge.backends.onnxruntime_runner.OnnxRuntimeRunner` (batched), peak decode and 3-D
  findings; ``--workers`` worker processes (:class:`~edge.offline.ProcessPoolDetector`), each with
  its own session and ``threads // workers`` ONNX Runtime intra-op threads;
* service -- the same model in the real streaming service (:class:`~edge.ingest.service.EdgeService`:
  Storage SCP, spool, ledger, pipeline threads, outputs), fed over C-STORE on loopback by
  :func:`~edge.ingest.replay.replay_cstore` in this process, as ``edge demo`` does.

Naive and ours alternate, one pass over every series each (``--rounds`` times), so that load
from other processes hits both alike; the service runs afterwards. Each side may use
``--threads`` cores: torch's intra-op threads for the naive pipeline; for ours, workers x ONNX
Runtime intra-op threads. Target: ours >= 10x naive.

    PYTHONPATH=. python bench/e2e_bench.py [--model M] [--teacher-checkpoint C] [--threads 2] [--workers 2]

Model (ours): ``--model``, else edge/models/student.int8.cpu.onnx, student.onnx, teacher.onnx,
else a *preliminary* stand-in made here: random weights, uniformly slimmed teacher with
parameters and MACs <= the student budget, INT8 Q/DQ in the CPU layout. Naive model: the
teacher from ``--teacher-checkpoint``, else the committed ``models/teacher/teacher.pt``, else
random weights of ``TEACHER_ARCH`` (the same cost per slice, measured: 98 vs 105 ms CPU).
Run it on a quiet machine: under load, eager PyTorch's thread pool loses more than our path
(an earlier run at load average 3.4-5.8 on 2 cores measured 15.8x; quiet, 4.2x).
Writes e2e_cpu.json and e2e_cpu.md.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import machine_info  # noqa: E402

from edge.ingest.pipeline import StageLatency  # noqa: E402  (after the path set-up above)

MODEL_DIR = REPO / "edge" / "models"
DEFAULT_MODEL_NAMES = ("student.int8.cpu.onnx", "student.onnx", "teacher.onnx")
RESULT_NAME = "e2e_cpu"
TARGET_RATIO = 10.0
ORIN_TARGET = {"device": "Jetson AGX Orin", "size": 512, "slices_per_s": 200.0, "p99_ms_per_slice": 20.0}
NAIVE_THRESHOLD = 0.5
OUR_STAGES = ("scan", "decode", "preprocess", "infer", "postprocess")


# --- machine and versions


VERSIONED = ("numpy", "pydicom", "cv2", "onnxruntime", "torch", "pynetdicom", "psutil")


def versions(names: Sequence[str] = VERSIONED) -> dict:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out["opencv" if name == "cv2" else name] = __import__(name).__version__
        except ImportError:
            out["opencv" if name == "cv2" else name] = None
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["PYTHONPATH=. python", script] + args)


# --- data and models


def write_phantom_series(out_dir, n_series: int, n_slices: int, size: int, seed: int = 2026) -> List[List[Path]]:
    """``n_series`` phantom series as DICOM files under ``out_dir``; the files of each, in slice order."""
    from edge.phantom import PROFILES, generate_series, write_series

    profiles = sorted(PROFILES)
    out = []
    for i in range(n_series):
        series = generate_series(seed + i, profiles[(seed + i) % len(profiles)], size=size, n_slices=n_slices)
        out.append(write_series(series, Path(out_dir) / f"series_{i:02d}"))
    return out


def default_model() -> Optional[Path]:
    """The first committed model of DEFAULT_MODEL_NAMES, or None."""
    return next((MODEL_DIR / n for n in DEFAULT_MODEL_NAMES if (MODEL_DIR / n).is_file()), None)


def student_sized_arch(cost_ratio: Optional[float] = None) -> Tuple[dict, dict]:
    """The teacher with every width scaled by one factor (multiples of 8), the widest whose parameters
    and MACs are both <= ``cost_ratio`` of the teacher's (default: the compression report's target).
    Returns (arch, {"parameters": ratio, "macs": ratio})."""
    from toolchain.compression.flops import model_cost
    from toolchain.compression.report import TARGET_COST_RATIO
    from toolchain.models.centernet_unet import build_model
    from toolchain.training.recipes import DEFAULT_PREPROCESS, TEACHER_ARCH

    cost_ratio = TARGET_COST_RATIO if cost_ratio is None else cost_ratio
    shape = (DEFAULT_PREPROCESS.channels, 64, 64)  # MAC ratios do not depend on the input size
    teacher = model_cost(build_model(TEACHER_ARCH), shape)
    best = None
    for scale in np.arange(0.30, 1.0, 0.01):
        arch = dict(TEACHER_ARCH, widths=[max(8, int(round(w * scale / 8)) * 8) for w in TEACHER_ARCH["widths"]],
                    head_width=max(8, int(round(TEACHER_ARCH["head_width"] * scale / 8)) * 8))
        ratio = model_cost(build_model(arch), shape).ratio_to(teacher)
        if ratio.parameters <= cost_ratio and ratio.macs <= cost_ratio:
            best = (arch, {"parameters": round(ratio.parameters, 3), "macs": round(ratio.macs, 3)})
    if best is None:
        raise ValueError(f"no uniform slimming of the teacher fits a cost ratio of {cost_ratio}")
    return best


def preliminary_model(out_dir) -> Tuple[Path, str]:
    """A random-weight student-sized model, exported and quantized (INT8 Q/DQ, CPU layout) into ``out_dir``.

    Stands in for the trained student until one is committed (latency does not depend on the weights
    or the calibration ranges; the ranges come from a few phantom slices)."""
    import torch

    from bench.int8_cpu_bench import make_int8, phantom_inputs
    from edge.decode.spec import DecodeSpec
    from edge.model_file import ModelSpecs
    from toolchain.export.onnx_export import export_onnx
    from toolchain.models.centernet_unet import OUTPUT_STRIDE, build_model
    from toolchain.training.recipes import DEFAULT_PREPROCESS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch, ratio = student_sized_arch()
    torch.manual_seed(0)
    fp32 = out_dir / "student_random.onnx"
    export_onnx(build_model(arch).eval(),
                ModelSpecs(DEFAULT_PREPROCESS, DecodeSpec(stride=OUTPUT_STRIDE), {"name": "random-student-size"}), fp32)
    int8 = make_int8(fp32, phantom_inputs(fp32), out_dir)["cpu"]
    note = (f"PRELIMINARY: random weights, teacher widths scaled to {arch['widths']} head {arch['head_width']} "
            f"({ratio['parameters']:.0%} of the teacher's parameters, {ratio['macs']:.0%} of its MACs), "
            "INT8 Q/DQ CPU layout")
    return int8, note


def preliminary_model_in_subprocess(out_dir) -> Tuple[Path, str]:
    """:func:`preliminary_model` in a child process (keeps torch out of a process that measures memory)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench.e2e_bench import preliminary_model; "
            "p, n = preliminary_model(sys.argv[2]); print(json.dumps([str(p), n]))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), str(out_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"making the preliminary model failed:\n{done.stderr[-2000:]}")
    path, note = json.loads(done.stdout.strip().splitlines()[-1])
    return Path(path), note


def resolve_model(given: Optional[str], work_dir, in_subprocess: bool = False) -> Tuple[Path, str, bool]:
    """(model path, note, preliminary) for ``--model``: the given file, a committed one, else a stand-in."""
    if given:
        return Path(given), "given with --model", False
    found = default_model()
    if found is not None:
        return found, "committed model", False
    make = preliminary_model_in_subprocess if in_subprocess else preliminary_model
    path, note = make(Path(work_dir) / "preliminary_model")
    return path, note, True


COMMITTED_TEACHER = REPO / "models" / "teacher" / "teacher.pt"


def naive_teacher(checkpoint: Optional[str] = None):
    """(eager fp32 teacher in eval mode, (channels, height, width), note)."""
    import torch

    from toolchain.models.centernet_unet import build_model
    from toolchain.training.recipes import DEFAULT_PREPROCESS, TEACHER_ARCH

    if checkpoint is None and COMMITTED_TEACHER.is_file():
        checkpoint = str(COMMITTED_TEACHER)
    if checkpoint:
        from toolchain.export.onnx_export import load_checkpoint

        model, specs = load_checkpoint(checkpoint)
        spec = specs.preprocess
        return model, (spec.channels, spec.out_height, spec.out_width), f"teacher checkpoint {checkpoint}"
    torch.manual_seed(0)
    spec = DEFAULT_PREPROCESS
    note = "random weights of TEACHER_ARCH (no trained teacher found; the cost per slice is the same)"
    return build_model(TEACHER_ARCH).eval(), (spec.channels, spec.out_height, spec.out_width), note


# --- the two pipelines


class NaivePipeline:
    """The article's per-request pipeline (see the module docstring). Stage times go to ``latency``:
    ``read``, ``normalize_resize``, ``forward``, ``postprocess`` and ``total`` per slice."""

    def __init__(self, model, input_chw: Tuple[int, int, int], latency: StageLatency):
        self.model = model
        self.channels, self.height, self.width = input_chw
        self.latency = latency

    def run_slice(self, path) -> int:
        import pydicom
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        a = pydicom.dcmread(path).pixel_array.astype(np.float32)
        t1 = time.perf_counter()
        a = (a - a.min()) / (a.max() - a.min())
        x = F.interpolate(torch.from_numpy(a)[None, None], size=(self.height, self.width), mode="bilinear",
                          align_corners=False).repeat(1, self.channels, 1, 1)
        t2 = time.perf_counter()
        with torch.no_grad():
            heatmap, _size, _offset = self.model(x)
        t3 = time.perf_counter()
        detections = int((torch.sigmoid(heatmap) > NAIVE_THRESHOLD).nonzero().shape[0])
        t4 = time.perf_counter()
        for stage, seconds in (("read", t1 - t0), ("normalize_resize", t2 - t1), ("forward", t3 - t2),
                               ("postprocess", t4 - t3), ("total", t4 - t0)):
            self.latency.record(stage, seconds)
        return detections

    def run_series(self, paths: Sequence[Path]) -> int:
        return sum(self.run_slice(p) for p in paths)


class OfflineDetectPath:
    """Our path: what ``edge detect --workers W`` runs over a folder: header scan and grouping by series,
    decode, preprocess, batched inference, peaks and 3-D findings; with ``workers`` > 1 in a
    :class:`~edge.offline.ProcessPoolDetector` (one ONNX Runtime session per worker process, started
    once), else :func:`edge.offline.detect_folder` on ``runner``. Stage times go to ``latency``: ``scan``
    and ``decode`` per file, ``preprocess`` per slice, ``infer`` and ``postprocess`` per slice (a
    batch's time divided by its size, as the runtime records them)."""

    def __init__(self, model_path, runner, specs, batch_size: int, workers: int, threads: int,
                 latency: StageLatency):
        from edge.offline import ProcessPoolDetector

        self.runner = runner
        self.specs = specs
        self.batch_size = batch_size
        self.workers = workers
        self.latency = latency
        self.pool = ProcessPoolDetector(model_path, workers, threads, batch_size) if workers > 1 else None

    def run_folder(self, folder) -> Tuple[int, int]:
        """(slices, findings) of every series under ``folder``."""
        from edge.offline import detect_folder

        if self.pool is not None:
            run = self.pool.detect(folder, record=self.latency.record)
        else:
            run = detect_folder(folder, self.runner, self.specs, record=self.latency.record,
                                batch_size=self.batch_size)
        if run.rejected:
            raise RuntimeError(f"the bench's own phantom files were rejected: {run.rejected[:3]}")
        return sum(s.n_slices for s in run.series), sum(len(s.findings) for s in run.series)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def cpu_seconds() -> float:
    """CPU time of this process and its live children (worker processes), all threads."""
    import psutil

    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # a child that just ended
            continue
        total += t.user + t.system
    return total


def run_side_by_side(series: Sequence[Sequence[Path]], folder, warm_folder, naive: NaivePipeline,
                     ours: OfflineDetectPath, rounds: int = 1) -> dict:
    """Each round: the naive pipeline over every series, then ours over their folder; slices/s of each."""
    naive.run_series(list(series[0][:2]))
    ours.run_folder(warm_folder)
    naive.latency, ours.latency = StageLatency(), StageLatency()  # warm-up times are not part of the result
    seconds = {"naive": 0.0, "ours": 0.0}
    cpu = {"naive": 0.0, "ours": 0.0}  # CPU time of this process and its workers: the work, whatever else ran
    slices = {"naive": 0, "ours": 0}
    found = detections = 0
    round_ratios = []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for paths in series:
            detections += naive.run_series(paths)
            slices["naive"] += len(paths)
        t1, c1 = time.perf_counter(), cpu_seconds()
        n, f = ours.run_folder(folder)
        t2, c2 = time.perf_counter(), cpu_seconds()
        slices["ours"] += n
        found += f
        seconds["naive"] += t1 - t0
        seconds["ours"] += t2 - t1
        round_ratios.append((t1 - t0) / (t2 - t1))  # the same slices on both sides: a ratio of slices/s
        cpu["naive"] += c1 - c0
        cpu["ours"] += c2 - c1
    if slices["ours"] != slices["naive"]:
        raise RuntimeError(f"ours detected {slices['ours']} slices, naive {slices['naive']}: not the same work")
    out = {}
    for name, pipeline, extra in (("naive", naive, {"heatmap_cells_over_threshold": detections}),
                                  ("ours", ours, {"findings": found})):
        out[name] = dict({"slices": slices[name], "seconds": round(seconds[name], 3),
                          "slices_per_s": slices[name] / seconds[name],
                          "cpu_ms_per_slice": cpu[name] / slices[name] * 1e3,
                          "latency": pipeline.latency.summary()}, **extra)
    out["cpu_ratio"] = out["naive"]["cpu_ms_per_slice"] / out["ours"]["cpu_ms_per_slice"]
    out["ratio"] = out["ours"]["slices_per_s"] / out["naive"]["slices_per_s"]
    out["round_ratios"] = [round(r, 2) for r in round_ratios]
    return out


def free_port() -> int:
    """A TCP port free on loopback now (the service's config takes a fixed port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_service(series: Sequence[Sequence[Path]], model_path, threads: int, batch_size: int, work_dir) -> dict:
    """The streaming service on loopback, fed over C-STORE; slices/s from the first send to drained."""
    from edge.config import config_from_dict
    from edge.ingest.replay import replay_cstore
    from edge.ingest.service import EdgeService

    work_dir = Path(work_dir)
    files = [p for paths in series for p in paths]
    config = config_from_dict({
        "scp": {"host": "127.0.0.1", "port": free_port(), "ae_title": "CT_EDGE"},
        "storage": {"state_dir": str(work_dir / "state")},
        "model": {"path": str(model_path), "intra_op_threads": threads, "batch_size": batch_size},
        "pipeline": {"series_idle_s": 2.0},
        "outputs": {"dir": str(work_dir / "results")},
        "metrics": {"enabled": False},
    }, source="bench/e2e_bench.py")
    service = EdgeService(config).start()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        report = replay_cstore(files, "127.0.0.1", service.scp_port, called_ae="CT_EDGE")
        sent_s = time.perf_counter() - t0
        drained = service.drain()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        latency = service.pipeline.latency.summary()
        counts = service.ledger.counts()
    finally:
        service.close()
    return {
        "slices": len(files), "seconds": round(elapsed, 3), "slices_per_s": len(files) / elapsed,
        "cpu_ms_per_slice": cpu / len(files) * 1e3,  # sender included (same process)
        "cstore_seconds": round(sent_s, 3), "stored": report.stored, "cstore_retries": report.retries,
        "failures": len(report.failures), "drained": drained, "ledger": counts, "latency": latency,
        "settings": {"batch_size": batch_size, "intra_op_threads": threads, "series_idle_s": 2.0,
                     "outputs": "jsonl, overlays, sr (defaults)", "sender": "replay_cstore in this process"},
    }


# --- report


def _ms(summary: dict, stage: str, key: str) -> str:
    s = summary.get(stage)
    return f"{s[key]:.2f}" if s else "n/a"


def write_markdown(report: dict, path: Path) -> None:
    m, r = report["machine"], report["results"]
    naive, ours, service = r["naive"], r["ours"], r.get("service")
    verdict = "met" if report["meets_target"] else "NOT met"
    lines = ["# End-to-end CPU throughput: our runtime path vs the naive pipeline", ""]
    if report["preliminary"]:
        lines += ["**PRELIMINARY**: no trained student is committed; ours ran a random-weight stand-in of the "
                  "student's size (see model). Rerun with the trained student (commands below).", ""]
    lines += [
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, niceness {m.get('niceness')}, load average "
        f"at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')} (a load above the core "
        "count means other jobs shared the CPU; naive and ours alternate, a pass over every series each, so both see it)",
        f"- threads: {report['threads']['note']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- data: {report['data']['series']} phantom series x {report['data']['slices_per_series']} slices, "
        f"{report['data']['size']}x{report['data']['size']} int16 DICOM files; {report['rounds']} timed pass(es) "
        "over every series",
        f"- ours: `{report['model']['name']}` ({report['model']['note']}), input "
        f"{report['model']['input']}, batch {report['batch_size']}",
        f"- naive: eager PyTorch fp32 teacher, batch 1, input {report['naive_model']['input']} "
        f"({report['naive_model']['note']})",
        f"- target: ours >= {TARGET_RATIO:.0f}x naive slices/s",
        "",
        "| path | slices | seconds | slices/s | vs naive | CPU ms / slice |",
        "|---|---:|---:|---:|---:|---:|",
        f"| naive (pydicom, min-max, torch eager teacher) | {naive['slices']} | {naive['seconds']:.1f} | "
        f"{naive['slices_per_s']:.2f} | 1.0x | {naive['cpu_ms_per_slice']:.1f} |",
        f"| ours (edge detect --workers {report['threads']['workers']}: scan, decode, preprocess, ORT batched, "
        f"findings) | {ours['slices']} | {ours['seconds']:.1f} | "
        f"{ours['slices_per_s']:.2f} | {r['ratio']:.1f}x | {ours['cpu_ms_per_slice']:.1f} |",
    ]
    if service:
        lines.append(f"| ours in the streaming service (C-STORE loopback -> findings, SR, overlays) | "
                     f"{service['slices']} | {service['seconds']:.1f} | {service['slices_per_s']:.2f} | "
                     f"{service['slices_per_s'] / naive['slices_per_s']:.1f}x | "
                     f"{service['cpu_ms_per_slice']:.1f} |")
    rounds = ", ".join(f"{x:.1f}x" for x in r.get("round_ratios", []))
    lines += ["", f"Ratio ours / naive: **{r['ratio']:.1f}x** slices/s (target {verdict}; per round: {rounds}); "
              f"{r['cpu_ratio']:.1f}x in CPU time per slice. CPU time is the process's and its worker "
              "processes', all threads: it counts the work done, whatever else the machine ran.", "",
              "Per-slice latency (ms), p50 / p99:", "",
              "| stage | ours | service |", "|---|---:|---:|"]
    svc = service["latency"] if service else {}
    stages = list(OUR_STAGES) + [s for s in svc if s not in OUR_STAGES]
    for stage in stages:
        lines.append(f"| {stage} | {_ms(ours['latency'], stage, 'p50_ms')} / {_ms(ours['latency'], stage, 'p99_ms')} "
                     f"| {_ms(svc, stage, 'p50_ms')} / {_ms(svc, stage, 'p99_ms')} |")
    nl = naive["latency"]
    lines += ["", "| naive stage | p50 | p99 |", "|---|---:|---:|"]
    for stage in ("read", "normalize_resize", "forward", "postprocess", "total"):
        lines.append(f"| {stage} | {_ms(nl, stage, 'p50_ms')} | {_ms(nl, stage, 'p99_ms')} |")
    lines += [
        "",
        "Ours: `scan` is the header read that groups files by series, `decode` the full read, per file; `infer` "
        "and `postprocess` are a batch's time divided by its size (as the runtime records them), measured inside "
        "each worker; `postprocess` is peak decoding, patient coordinates and 3-D linking. Both sides keep both "
        "cores busy: the naive one through torch's intra-op threads, ours through series in parallel worker "
        "processes (CPU time counts theirs). Service: `decode` is the intake's "
        "decode+check, `receive` the spool write+fsync and ledger, `slice_latency` receipt to inferred, `close` "
        "and `output` per series (outputs written). Naive postprocess is sigmoid and a threshold only.",
        "",
        "## Jetson AGX Orin target (on paper, not measured here: no Jetson)",
        "",
        f"- >= {ORIN_TARGET['slices_per_s']:.0f} slices/s at {ORIN_TARGET['size']}x{ORIN_TARGET['size']}, "
        f"p99 < {ORIN_TARGET['p99_ms_per_slice']:.0f} ms per slice, with the TensorRT INT8 engine and the CUDA "
        "preprocessing path (see docs/runtime.md, jetson/).",
        "",
        "## Rerun",
        "",
        "    PYTHONPATH=. python bench/e2e_bench.py                                  # committed model",
        "    PYTHONPATH=. python bench/e2e_bench.py --model edge/models/student.onnx --name e2e_cpu_fp32"
        "   # FP32 student",
        "",
    ]
    path.write_text("\n".join(lines))


def build_report(results: dict, *, command: str, machine: dict, threads: Tuple[int, int, int],
                 model: Tuple[Path, str, bool], specs,
                 input_dtype, naive: Tuple[Tuple[int, int, int], str], batch_size: int, rounds: int,
                 data: Tuple[int, int, int]) -> dict:
    """The JSON report: ``results`` of :func:`run_side_by_side` (+ ``service``) with what was run where."""
    model_path, model_note, preliminary = model
    chw, naive_note = naive
    spec = specs.preprocess
    dtype = np.dtype(input_dtype)
    return {
        "tool": "bench/e2e_bench.py",
        "date": utc_now(),
        "command": command,
        "machine": machine,
        "versions": versions(),
        "threads": {"torch_intra_op": threads[0], "workers": threads[1], "onnxruntime_intra_op": threads[2],
                    "opencv": threads[2], "service_onnxruntime_intra_op": threads[0],
                    "note": f"naive: torch intra-op {threads[0]}; ours: {threads[1]} worker process(es) x "
                            f"{threads[2]} ONNX Runtime intra-op thread(s), OpenCV {threads[2]}; service: ONNX "
                            f"Runtime intra-op {threads[0]}"},
        "preliminary": preliminary,
        "model": {"name": Path(model_path).name, "note": model_note, "dtype": str(dtype),
                  "input": f"{spec.channels}x{spec.out_height}x{spec.out_width} ({spec.slices} slices x "
                           f"{len(spec.windows)} window(s)), {dtype}"},
        "naive_model": {"input": "x".join(str(d) for d in chw) + " float32 (one slice repeated)", "note": naive_note},
        "batch_size": batch_size,
        "rounds": rounds,
        "data": {"series": data[0], "slices_per_series": data[1], "size": data[2]},
        "target_ratio": TARGET_RATIO,
        "meets_target": results["ratio"] >= TARGET_RATIO,
        "orin_target_on_paper": ORIN_TARGET,
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="our ONNX model (default: committed student/teacher, else a preliminary stand-in)")
    p.add_argument("--teacher-checkpoint",
                   help="naive side's weights (default: models/teacher/teacher.pt, else random TEACHER_ARCH)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads each side may use: torch intra-op (naive); ours: --workers x ONNX Runtime "
                        "intra-op threads (threads // workers each) (default %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="our series in flight at once (edge detect --workers) (default %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="our inference batch (default %(default)s, the runtime's)")
    p.add_argument("--series", type=int, default=2)
    p.add_argument("--slices", type=int, default=60, help="slices per series (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="phantom image size (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="timed passes over every series (default %(default)s)")
    p.add_argument("--no-service", action="store_true", help="skip the streaming-service row")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default=RESULT_NAME, help="result file stem (default %(default)s)")
    args = p.parse_args(argv)

    import cv2
    import torch

    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner
    from edge.model_file import ModelSpecs

    from edge.cli import threads_per_worker

    ort_threads = threads_per_worker(args.workers, cores=args.threads)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(ort_threads)  # OpenCV runs only in our preprocessing, inside each worker
    machine = machine_info(args.threads)
    work = Path(tempfile.mkdtemp(prefix="e2e_bench_"))
    try:
        print(f"phantoms: {args.series} x {args.slices} slices {args.size}x{args.size} -> {work}", flush=True)
        series = write_phantom_series(work / "scanner", args.series, args.slices, args.size)
        warm = work / "warm"
        warm.mkdir()
        for path in series[0][:8]:
            shutil.copy(path, warm / path.name)
        model_path, model_note, preliminary = resolve_model(args.model, work)
        print(f"ours: {model_path.name} ({model_note})", flush=True)
        teacher, chw, teacher_note = naive_teacher(args.teacher_checkpoint)
        runner = OnnxRuntimeRunner(model_path, intra_op_threads=ort_threads).activate()
        try:
            specs = ModelSpecs.from_metadata(runner.custom_metadata(), source=model_path)
            meta = next(iter(runner.input_metadata().values()))
            ours = OfflineDetectPath(model_path, runner, specs, args.batch, args.workers, ort_threads, StageLatency())
            try:
                results = run_side_by_side(series, work / "scanner", warm,
                                           NaivePipeline(teacher, chw, StageLatency()), ours, rounds=args.rounds)
            finally:
                ours.close()
        finally:
            runner.deactivate()
        print(f"naive {results['naive']['slices_per_s']:.2f} slices/s, ours {results['ours']['slices_per_s']:.2f} "
              f"slices/s ({results['ratio']:.1f}x)", flush=True)
        if not args.no_service:
            results["service"] = run_service(series, model_path, args.threads, args.batch, work / "service")
            print(f"service {results['service']['slices_per_s']:.2f} slices/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report = build_report(results, command=command_line("bench/e2e_bench.py", argv), machine=machine,
                          threads=(args.threads, args.workers, ort_threads), model=(model_path, model_note, preliminary), specs=specs,
                          input_dtype=meta.dtype, naive=(chw, teacher_note), batch_size=args.batch,
                          rounds=args.rounds, data=(args.series, args.slices, args.size))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out_dir / f"{args.name}.md")
    print((out_dir / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
