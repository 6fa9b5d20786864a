#!/usr/bin/env python3
"""How close is the INT8 model to FP32? Output errors, findings, CPM (CLI over calib.accuracy and calib.sweep).

1. Outputs, with polygraphy's Comparator on the calibration manifest's slices:
   FP32 ONNX Runtime vs INT8 Q/DQ ONNX Runtime (both placements), and a
   TensorRT engine vs FP32 ONNX Runtime when --engine is given and TensorRT is
   installed. Errors per output: mean / median / p99 / max absolute, and max /
   mean absolute at the reference heatmap's peak cells.
2. Findings: one series through the runtime's detector with each model, matched
   within --tolerance-mm (default: a phantom series made here).
3. CPM (with --cpm-data and --annotations): FP32 vs INT8; with --sweep-methods /
   --sweep-sizes also one INT8 model per calibration method and size.

On x86-64 CPUs without VNNI, ONNX Runtime's fused INT8 kernels saturate and
the INT8 models are refused; --qdq-as-written runs their Q/DQ nodes as written
(float arithmetic, no fused integer kernels: slower, correct on every CPU).

Exit status: 0 done (and the CPM drop within --max-cpm-drop when CPM is
measured), 1 error or CPM drop above the limit, 2 bad command line.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from calib.accuracy import (  # noqa: E402
    compare_runners,
    cpm_of_model,
    detect_with_model,
    match_findings,
    onnxrt_runner,
    trt_runner,
)
from calib.data_loader import DEFAULT_MANIFEST, CalibrationDataLoader, default_model  # noqa: E402
from calib.ranges import METHODS  # noqa: E402
from calib.sweep import cpm_sweep, format_table  # noqa: E402
from edge.backends.cpu_features import SATURATING_KERNELS, integer_kernels_saturate  # noqa: E402
from edge.errors import ConfigError, EdgeError, InputError, report_user_error  # noqa: E402

DEFAULT_OUT = REPO / "engines" / "built"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", help="FP32 ONNX model (default: edge/models/student.onnx, else teacher.onnx)")
    p.add_argument("--int8", action="append", metavar="ONNX",
                   help="INT8 Q/DQ model(s) to compare "
                        "(default: engines/built/<stem>.int8.qdq.onnx and .int8.cpu.onnx)")
    p.add_argument("--engine", help="TensorRT engine to compare too (needs TensorRT)")
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="calibration manifest (default %(default)s)")
    p.add_argument("--pool", help="pool folder, if it moved since the manifest was written")
    p.add_argument("--limit", type=int, default=50, help="slices of the manifest to compare on (default %(default)s)")
    p.add_argument("--series", metavar="DIR",
                   help="one DICOM series for the findings check (default: a phantom series)")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="findings match distance (default %(default)s)")
    p.add_argument("--cpm-data", metavar="DIR", help="annotated folder of series for CPM")
    p.add_argument("--annotations", help="LUNA16 annotations.csv of --cpm-data")
    p.add_argument("--max-cpm-drop", type=float, default=0.01, help="fail when INT8 CPM < FP32 CPM - this")
    p.add_argument("--sweep-methods", help=f"comma list of {', '.join(METHODS)}: CPM per method (needs --calib-pool)")
    p.add_argument("--sweep-sizes", default="300", help="comma list of calibration sizes for the sweep")
    p.add_argument("--calib-pool", help="pool of series for the sweep's slice selection")
    p.add_argument("--qdq-as-written", action="store_true",
                   help="run the INT8 models' quantize/dequantize nodes as written (graph optimizations off): "
                        "slower, correct on every CPU, needed where the fused INT8 kernels saturate")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the sweep's models (default %(default)s)")
    return p


def _phantom_frames():
    from edge.phantom import generate_series

    series = generate_series(seed=20240, profile="ge_standard", size=256, n_slices=64, n_nodules=4)
    return series.frames(), "phantom series (seed 20240, ge_standard, 256 px, 64 slices, 4 nodules)"


def _series_frames(folder):
    from toolchain.export.parity import read_series

    return read_series(folder), f"series {folder}"


def run(args) -> int:
    onnx_path = Path(args.onnx) if args.onnx else default_model()
    stem = onnx_path.stem
    int8 = [Path(p) for p in args.int8] if args.int8 else [
        DEFAULT_OUT / f"{stem}.int8.qdq.onnx", DEFAULT_OUT / f"{stem}.int8.cpu.onnx"]
    for p in [onnx_path] + int8:
        if not p.is_file():
            raise InputError(p, "model not found (make the INT8 models with tools/build_engine.py --int8)")
    as_written = args.qdq_as_written
    if not as_written and integer_kernels_saturate():
        raise ConfigError(f"INT8 models refused: {SATURATING_KERNELS}; measure them with --qdq-as-written")
    report = {"fp32": str(onnx_path), "int8": [str(p) for p in int8], "qdq_as_written": as_written}

    loader = CalibrationDataLoader.for_model(onnx_path, args.manifest, limit=args.limit, pool_root=args.pool)
    from edge.model_file import read_model_specs

    decode = read_model_specs(onnx_path).decode
    runners = [onnxrt_runner(onnx_path, "fp32-onnxruntime")]
    runners += [onnxrt_runner(p, f"int8-onnxruntime[{p.name}]", qdq_as_written=as_written) for p in int8]
    if args.engine:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            print(f"TensorRT comparison skipped: TensorRT is not installed here ({args.engine} needs the target)")
        else:
            runners.append(trt_runner(args.engine, f"tensorrt[{Path(args.engine).name}]"))
    comparisons = compare_runners(runners, loader, decode.score_threshold, decode.nms_kernel)
    for c in comparisons:
        print(c.format())
    report["outputs"] = {c.candidate: {k: vars(e) for k, e in c.errors.items()} for c in comparisons}

    frames, source = _series_frames(args.series) if args.series else _phantom_frames()
    reference = detect_with_model(onnx_path, frames)
    report["findings"] = {}
    for p in int8:
        agreement = match_findings(reference, detect_with_model(p, frames, as_written), args.tolerance_mm)
        print(f"{p.name} on the {source}: {agreement.format()}")
        report["findings"][p.name] = vars(agreement)

    status = 0
    if args.cpm_data:
        if not args.annotations:
            raise ConfigError("--cpm-data needs --annotations")
        fp32_cpm, scans = cpm_of_model(onnx_path, args.cpm_data, args.annotations)
        report["cpm"] = {"fp32": fp32_cpm, "scans": scans}
        for p in int8:
            cpm, _ = cpm_of_model(p, args.cpm_data, args.annotations, qdq_as_written=as_written)
            report["cpm"][p.name] = cpm
            verdict = "within" if cpm >= fp32_cpm - args.max_cpm_drop else "BELOW"
            print(f"CPM on {scans} scan(s): fp32 {fp32_cpm:.4f}, {p.name} {cpm:.4f} ({cpm - fp32_cpm:+.4f}, "
                  f"{verdict} the {args.max_cpm_drop:g} limit)")
            if verdict == "BELOW":
                status = 1
        if args.sweep_methods:
            if not args.calib_pool:
                raise ConfigError("--sweep-methods needs --calib-pool")
            methods = [m.strip() for m in args.sweep_methods.split(",") if m.strip()]
            bad = [m for m in methods if m not in METHODS]
            if bad:
                raise ConfigError(f"--sweep-methods: unknown method(s) {', '.join(bad)} (known: {', '.join(METHODS)})")
            try:
                sizes = [int(s) for s in args.sweep_sizes.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--sweep-sizes must be a comma list of integers, got {args.sweep_sizes!r}") from None
            rows = cpm_sweep(onnx_path, args.calib_pool, args.cpm_data, args.annotations, methods, sizes, args.out,
                             qdq_as_written=as_written)
            print(format_table(rows))
            report["sweep"] = [vars(r) for r in rows]
    elif args.sweep_methods:
        raise ConfigError("--sweep-methods needs --cpm-data and --annotations")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    return status


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EdgeError as exc:
        return report_user_error(exc)


if __name__ == "__main__":
    sys.exit(main())
