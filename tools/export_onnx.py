#!/usr/bin/env python3
"""Export a training checkpoint to a self-describing ONNX model checked against PyTorch (CLI over toolchain.export).

The model is written to --out only when ONNX Runtime matches PyTorch within
1e-4 (max abs difference, every output) on real preprocessed slices.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from edge.decode.spec import read_decode_spec
from edge.errors import ConfigError, EdgeError, InputError, report_user_error
from toolchain.export.onnx_export import DEFAULT_OPSET, export_onnx, load_checkpoint, summarize_graph
from toolchain.export.parity import (
    DEFAULT_PARITY_INPUTS,
    DEFAULT_TOLERANCE,
    ParityError,
    check_parity,
    network_inputs,
    parity_frames,
    require_parity,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) with arch, state_dict and specs")
    p.add_argument("--out", required=True, help="ONNX model file to write")
    p.add_argument("--parity-series", metavar="DIR",
                   help="folder with one DICOM CT series for the parity check (default: a synthetic chest series)")
    p.add_argument("--parity-inputs", type=int, default=DEFAULT_PARITY_INPUTS, metavar="N",
                   help="slices of the series to compare on, evenly spaced (default %(default)s)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 17 or later (default %(default)s)")
    p.add_argument("--decode", metavar="JSON",
                   help="decode spec file to embed instead of the checkpoint's (e.g. one tuned on validation series); "
                        "its stride must be the model's")
    return p



def run(args) -> str:
    if args.parity_inputs < 1:
        raise ConfigError(f"--parity-inputs must be at least 1, got {args.parity_inputs}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(out, "its folder does not exist")
    model, specs = load_checkpoint(args.checkpoint)
    if args.decode:
        specs = dataclasses.replace(specs, decode=read_decode_spec(args.decode))
    frames, source = parity_frames(args.parity_series)
    inputs = network_inputs(frames, specs.preprocess, args.parity_inputs)
    staging = out.with_name(f".{out.name}.unchecked")
    try:
        exported = export_onnx(model, specs, staging, opset=args.opset)
        stats = check_parity(model, staging, inputs)
        try:
            require_parity(stats, out, DEFAULT_TOLERANCE)
        except ParityError as e:
            raise ParityError(f"{e}; the model was not written") from None
        try:
            staging.replace(out)
        except OSError as e:
            raise InputError(out, f"cannot write the model: {e.strerror or e}") from None
    finally:
        staging.unlink(missing_ok=True)
    return "\n".join([
        f"exported {out} from {args.checkpoint}",
        summarize_graph(exported).format(),
        f"parity on {stats.batch} input(s) from the {source}, max abs diff (limit {DEFAULT_TOLERANCE:g}):",
        f"  {stats.format()}",
    ])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except EdgeError as exc:
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
