"""ONNX Runtime CPU latency: FP32 vs INT8 Q/DQ, side by side in one run.

The models: ``--onnx`` (default edge/models/student.onnx, else teacher.onnx,
else a random-weight model of the teacher's size exported here -- latency does
not depend on the weights) and its INT8 Q/DQ models, given with ``--int8`` or
made here from ranges collected on a few phantom slices (latency does not
depend on the ranges either): the CPU placement (``calib.qdq`` layout
"cpu", what the CPU runtime should load) and, for the record, the TensorRT
placement. Sessions use all graph optimizations and ``--threads`` intra-op
threads; rounds interleave the models so machine load hits them alike.
Target: FP32 / INT8 (CPU placement) median >= 1.5.

    PYTHONPATH=. python bench/int8_cpu_bench.py [--onnx M] [--int8 Q] [--threads 2] [--batch 1] [--out bench/results]

Writes int8_cpu.json and int8_cpu.md (machine, date, command, versions).
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import machine_info  # noqa: E402

TARGET_RATIO = 1.5


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__}


def random_teacher(path: Path) -> Path:
    """A random-weight model with the teacher's architecture and preprocessing (needs torch)."""
    import torch

    from edge.decode.spec import DecodeSpec
    from edge.model_file import ModelSpecs
    from toolchain.export.onnx_export import export_onnx
    from toolchain.models.centernet_unet import OUTPUT_STRIDE, build_model
    from toolchain.training.recipes import DEFAULT_PREPROCESS, TEACHER_ARCH

    torch.manual_seed(0)
    model = build_model(TEACHER_ARCH).eval()
    export_onnx(model, ModelSpecs(DEFAULT_PREPROCESS, DecodeSpec(stride=OUTPUT_STRIDE), {"name": "random-teacher"}),
                path)
    return path


def phantom_inputs(onnx_path: Path, n: int = 6) -> np.ndarray:
    """``n`` network inputs from a phantom series, through the runtime's preprocessing."""
    from calib.data_loader import model_interface
    from edge.phantom import generate_series
    from edge.preprocess.cpu import CpuPreprocessor, iter_network_inputs

    specs, _, dtype = model_interface(onnx_path)
    frames = generate_series(seed=7, profile="ge_standard", size=256, n_slices=n).frames()
    return np.stack([x[0].astype(dtype) for x in iter_network_inputs(frames, CpuPreprocessor(specs.preprocess))])


def make_int8(onnx_path: Path, inputs: np.ndarray, out_dir: Path) -> dict:
    """Both Q/DQ placements of ``onnx_path`` with percentile ranges from ``inputs``."""
    import onnx

    from calib.qdq import quantize_model, write_model
    from calib.ranges import ActivationCollector, compute_ranges

    histograms = ActivationCollector(onnx_path).collect(lambda: (inputs[i:i + 1] for i in range(len(inputs))))
    amax = compute_ranges(histograms, "percentile")
    model = onnx.load(str(onnx_path))
    out = {}
    for layout in ("cpu", "tensorrt"):
        path = out_dir / f"{onnx_path.stem}.int8.{layout}.onnx"
        write_model(path, quantize_model(model, amax, layout, {"method": "percentile", "purpose": "benchmark"}).model)
        out[layout] = path
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(models: dict, x: np.ndarray, threads: int, rounds: int, warmup: int) -> dict:
    """Per-model latency samples (ms), rounds interleaved across models."""
    sessions = {name: session(path, threads) for name, path in models.items()}
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    samples = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[name])
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def summarize(samples: dict) -> dict:
    out = {}
    for name, s in samples.items():
        ordered = sorted(s)
        out[name] = {"median_ms": statistics.median(s), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
                     "min_ms": ordered[0], "rounds": len(s)}
    return out


def write_markdown(report: dict, path: Path) -> None:
    m, r = report["machine"], report["results"]
    lines = [
        "# ONNX Runtime CPU latency: FP32 vs INT8 Q/DQ",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads_used']} intra-op thread(s), "
        f"load average at start {m.get('load_average_at_start')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- model: {report['model']} ({report['model_note']}), input {report['input_shape']}",
        f"- target: FP32 / INT8 (CPU placement) >= {TARGET_RATIO}x",
        "",
        "| model | median ms | p90 ms | min ms | FP32 / this |",
        "|---|---:|---:|---:|---:|",
    ]
    base = r["fp32"]["median_ms"]
    for name, s in r.items():
        lines.append(f"| {name} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['min_ms']:.2f} | "
                     f"{base / s['median_ms']:.2f}x |")
    verdict = "met" if report["ratio_cpu_placement"] >= TARGET_RATIO else "NOT met"
    lines += ["", f"Ratio FP32 / INT8 (CPU placement): **{report['ratio_cpu_placement']:.2f}x** (target {verdict}). "
              "The TensorRT placement (Q/DQ on Conv inputs only) computes the same numbers but leaves ONNX Runtime "
              "float convolutions with dequantized weights, so it is listed for the record only.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", help="FP32 model (default: edge/models/student.onnx, teacher.onnx, else a random teacher)")
    p.add_argument("--int8", help="INT8 Q/DQ model in the CPU placement (default: made here)")
    p.add_argument("--also", action="append", default=[], metavar="ONNX",
                   help="another model to time in the same rounds, for the record (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="slices per inference (default %(default)s)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)

    from calib.data_loader import MODEL_DIR

    work = Path(tempfile.mkdtemp(prefix="int8_bench_"))
    if args.onnx:
        onnx_path, note = Path(args.onnx), "given"
    else:
        found = [MODEL_DIR / n for n in ("student.onnx", "teacher.onnx") if (MODEL_DIR / n).is_file()]
        if found:
            onnx_path, note = found[0], "committed model"
        else:
            onnx_path, note = random_teacher(work / "random_teacher.onnx"), "random weights, teacher architecture"
    inputs = phantom_inputs(onnx_path)
    models = {"fp32": onnx_path}
    made = make_int8(onnx_path, inputs, work)
    models["int8 (CPU placement)"] = Path(args.int8) if args.int8 else made["cpu"]
    models["int8 (TensorRT placement)"] = made["tensorrt"]
    for extra in args.also:
        models[f"for the record: {extra}"] = Path(extra)
    reps = -(-args.batch // len(inputs))
    x = np.ascontiguousarray(np.concatenate([inputs] * reps)[:args.batch])
    results = summarize(measure(models, x, args.threads, args.rounds, args.warmup))
    ratio = results["fp32"]["median_ms"] / results["int8 (CPU placement)"]["median_ms"]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/int8_cpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(args.threads), "versions": versions(),
        "model": onnx_path.name, "model_note": note, "input_shape": list(x.shape),
        "results": results, "ratio_cpu_placement": ratio,
        "ratio_tensorrt_placement": results["fp32"]["median_ms"] / results["int8 (TensorRT placement)"]["median_ms"],
        "target_ratio": TARGET_RATIO,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "int8_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out_dir / "int8_cpu.md")
    print((out_dir / "int8_cpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
