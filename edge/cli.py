"""``edge`` command line. Parses arguments and calls library code; user-facing
errors (:class:`edge.errors.EdgeError`) print one line and exit 1."""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from edge.errors import EdgeError, report_user_error

MODELS_DIR = Path(__file__).resolve().parent / "models"


def default_model_path() -> Path:
    for name in ("student.onnx", "teacher.onnx"):
        p = MODELS_DIR / name
        if p.is_file():
            return p
    raise EdgeError(f"no model given and none committed in {MODELS_DIR}; pass --model MODEL.onnx")


def _open_runner(model_path, intra_op_threads: int = 0):
    from edge.backends.onnxruntime_runner import open_onnxruntime_runner

    return open_onnxruntime_runner(model_path, intra_op_threads=intra_op_threads)


def threads_per_worker(workers: int, cores: Optional[int] = None) -> int:
    """ONNX Runtime intra-op threads for each of ``workers`` concurrent series: the cores shared out, >= 1."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def cmd_detect(args) -> int:
    from edge.offline import (
        ProcessPoolDetector,
        detect_folder,
        write_image_positions_csv,
        write_predictions_csv,
        write_rejections_csv,
        write_slice_predictions_csv,
    )

    model = Path(args.model) if args.model else default_model_path()
    threads = args.threads if args.threads is not None else threads_per_worker(args.workers)
    runner, specs = _open_runner(model, threads)  # a bad model is one clear error before any worker starts
    t0 = time.perf_counter()

    def report(result):
        print(f"series {result.series_uid}: {result.n_slices} slices, {len(result.findings)} finding(s)", flush=True)

    try:
        if args.workers == 1:
            run = detect_folder(args.dir, runner, specs, on_series=report)
        else:
            runner.deactivate()  # each worker process opens its own session
            with ProcessPoolDetector(model, args.workers, threads) as pool:
                run = pool.detect(args.dir, on_series=report)
    finally:
        runner.deactivate()
    write_predictions_csv(args.out, run)
    if args.slice_predictions:
        write_slice_predictions_csv(args.slice_predictions, run)
    if args.image_positions:
        write_image_positions_csv(args.image_positions, run)
    if run.rejected:
        rej = Path(args.out).with_suffix(".rejected.csv")
        write_rejections_csv(rej, run)
        print(f"{len(run.rejected)} file(s) not used, reasons in {rej}")
        for r in run.rejected[:5]:
            print(f"  skipped {r.path}: {r.reason}")
    n_slices = sum(s.n_slices for s in run.series)
    dt = time.perf_counter() - t0
    print(f"{len(run.series)} series, {n_slices} slices in {dt:.1f} s; predictions written to {args.out}")
    return 0


def cmd_info(args) -> int:
    model = Path(args.model) if args.model else default_model_path()
    runner, specs = _open_runner(model)
    meta = runner.input_metadata()
    runner.deactivate()
    print(json.dumps({
        "model": str(model),
        "inputs": {k: [str(v.dtype), list(v.shape)] for k, v in meta.items()},
        "preprocess": specs.preprocess.to_dict(),
        "decode": specs.decode.to_dict(),
        "card": specs.card,
    }, indent=2))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="CT lung-nodule detection runtime")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="offline detection over a folder of DICOM series -> LUNA16 predictions CSV")
    d.add_argument("dir", help="folder with DICOM series (any layout; non-DICOM files are skipped and reported)")
    d.add_argument("--model", help="ONNX model with embedded specs (default: the committed model)")
    d.add_argument("--out", default="predictions.csv", help="predictions CSV (default: %(default)s)")
    d.add_argument("--slice-predictions", metavar="CSV",
                   help="also write every slice's 2-D detections (coordZ = image z), for per-image metrics")
    d.add_argument("--image-positions", metavar="CSV",
                   help="also write one row per image (seriesuid, coordZ): the FP-per-image divisor")
    d.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes, each decoding and detecting one series at a time with its own "
                        "ONNX Runtime session (default: %(default)s)")
    d.add_argument("--threads", type=_positive_int,
                   help="ONNX Runtime intra-op threads per worker (default: the CPU cores / --workers)")
    d.set_defaults(func=cmd_detect)

    i = sub.add_parser("info", help="print a model's inputs and embedded specs")
    i.add_argument("--model", help="ONNX model (default: the committed model)")
    i.set_defaults(func=cmd_info)

    from edge.ingest.commands import add_parsers as add_ingest_parsers
    from edge.update.commands import add_parsers as add_update_parsers

    add_ingest_parsers(sub)
    add_update_parsers(sub)

    m = sub.add_parser("demo", help="scanner demo on loopback: phantom series -> C-STORE -> runtime -> findings")
    m.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    m.add_argument("--series", type=int, default=2, help="number of phantom series (default: %(default)s)")
    m.add_argument("--slices", type=int, default=60, help="slices per series (default: %(default)s)")
    m.add_argument("--rate", type=float, help="scanner rate in slices/s (default: as fast as accepted)")
    m.add_argument("--model", help="ONNX model (default: the committed model)")
    m.add_argument("--report-threshold", type=float,
                   help="report findings from this probability (default: the model's validated operating point)")
    m.set_defaults(func=cmd_demo)

    s = sub.add_parser("selftest", help="run the CPU path on a generated phantom slice (no network needed)")
    s.set_defaults(func=cmd_selftest)
    return p


def cmd_demo(args) -> int:
    from edge.demo import DemoOptions, run_demo

    if args.series < 1 or args.slices < 3:
        raise EdgeError("edge demo: --series must be >= 1 and --slices >= 3")
    opts = DemoOptions(Path(args.out), series=args.series, slices=args.slices, rate=args.rate,
                       model=Path(args.model) if args.model else None, report_threshold=args.report_threshold)
    for line in run_demo(opts):
        print(line, flush=True)
    return 0


def cmd_selftest(args) -> int:
    from edge.selftest import run_selftest

    for line in run_selftest():
        print(line)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeError as e:
        return report_user_error(e)


if __name__ == "__main__":
    sys.exit(main())
