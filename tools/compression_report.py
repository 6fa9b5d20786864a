#!/usr/bin/env python3
"""The compression table: parameters, MACs, ONNX Runtime CPU latency and CPM per model, with the issue's targets.

    python tools/compression_report.py \\
        --model teacher runs/teacher/best.pt --eval teacher runs/eval/teacher.json \\
        --model pruned runs/finetuned/best.pt --eval pruned runs/eval/finetuned.json \\
        --model distilled runs/distilled/best.pt --eval distilled runs/eval/distilled.json \\
        --model scratch runs/scratch/best.pt --eval scratch runs/eval/scratch.json

Names teacher / pruned / distilled / scratch enable the target checks; ratios
are to the teacher's row (else the first). Latency: every model exported to
ONNX and timed in one process, round-robin, batch 1.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import ConfigError, EdgeError, report_user_error  # noqa: E402

DEFAULT_JSON = "bench/results/compression.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=2, action="append", required=True, metavar=("NAME", "CHECKPOINT"),
                   help="a row: its name and training checkpoint (repeat)")
    p.add_argument("--eval", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                   help="evaluation JSON (tools/evaluate.py --out-json) of the row NAME (repeat)")
    p.add_argument("--out-json", default=DEFAULT_JSON, help="default %(default)s")
    p.add_argument("--out-md", help="default: --out-json with .md")
    p.add_argument("--onnx-dir", help="keep the exported ONNX files here (default: temporary)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default %(default)s)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per model (default %(default)s)")
    return p


def run(args) -> str:
    from toolchain.compression.report import ModelEntry, build_report, build_rows, format_markdown, write_report

    names = [name for name, _ in args.model]
    evaluations = dict(args.eval)
    unknown = sorted(set(evaluations) - set(names))
    if unknown:
        raise ConfigError(f"--eval names no --model row: {', '.join(unknown)}")
    entries = [ModelEntry(name, ckpt, evaluations.get(name)) for name, ckpt in args.model]
    rows = build_rows(entries, threads=args.threads, runs=args.runs, warmup=args.warmup, onnx_dir=args.onnx_dir)
    report = build_report(rows, args.threads, args.runs)
    out_md = args.out_md or str(Path(args.out_json).with_suffix(".md"))
    write_report(report, args.out_json, out_md)
    return f"{format_markdown(report)}\nwrote {args.out_json} and {out_md}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except EdgeError as e:
        return report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
