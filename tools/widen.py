#!/usr/bin/env python3
"""Widen chosen convolutions of a pruned detector without changing its outputs (then distill it further).

    python tools/widen.py --checkpoint runs/s4/last.pt --out runs/wide/widened.pt \\
        [--level 0=16] [--heads 32] [--conv NAME=CHANNELS ...] [--teacher models/teacher/teacher.pt]

--level K=W sets every conv at resolution level K (0: stride 2; stem, encoder,
decoder) to W channels, --heads W the three heads' 3x3 convs, --conv one conv
by name. New channels start with zero outgoing weights, so the widened model
computes what the narrow one did (see toolchain/compression/widening.py).
With --teacher, parameters and MACs are printed as fractions of the teacher's.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import ConfigError, EdgeError, report_user_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="detector checkpoint to widen (.pt, e.g. a distilled student)")
    p.add_argument("--out", required=True, help="widened checkpoint to write (.pt)")
    p.add_argument("--level", action="append", default=[], metavar="K=W",
                   help="all convs at resolution level K get W channels (repeatable)")
    p.add_argument("--heads", type=int, default=None, metavar="W", help="the heads' 3x3 convs get W channels")
    p.add_argument("--conv", action="append", default=[], metavar="NAME=W",
                   help="one conv by name, e.g. enc.1.block.0.0=32 (repeatable)")
    p.add_argument("--teacher", default=None, help="reference checkpoint for the printed cost ratios")
    p.add_argument("--seed", type=int, default=0, help="seed of the new channels' initial weights")
    return p


def requested_widths(args, levels: int) -> dict:
    """{conv name: channels} from --level, --heads and --conv; ConfigError when nothing is asked."""
    from toolchain.compression.widening import resolve_width_settings

    widths = resolve_width_settings(levels, args.level, args.heads, args.conv)
    if not widths:
        raise ConfigError("nothing to widen: give --level, --heads or --conv")
    return widths


def run(args):
    from toolchain.compression.flops import model_cost
    from toolchain.compression.pruning import example_shape
    from toolchain.compression.widening import widen_checkpoint
    from toolchain.export.onnx_export import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint)
    widths = requested_widths(args, len(model.enc))
    wide = widen_checkpoint(args.checkpoint, args.out, widths, seed=args.seed)
    before, after = model_cost(model, example_shape(model)), model_cost(wide, example_shape(wide))
    lines = [f"widened checkpoint: {args.out}",
             f"parameters {before.parameters:,} -> {after.parameters:,}; MACs {before.macs:,} -> {after.macs:,}"]
    if args.teacher:
        teacher, _ = load_checkpoint(args.teacher)
        ref = model_cost(teacher, example_shape(teacher))
        lines.append(f"of the teacher: parameters {after.parameters / ref.parameters:.1%}, "
                     f"MACs {after.macs / ref.macs:.1%}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lines = run(args)
    except EdgeError as e:
        return report_user_error(e)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
