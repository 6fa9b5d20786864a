#!/usr/bin/env python3
"""Average the weights of checkpoints fine-tuned from the same start (one architecture) into one checkpoint.

    python tools/average_checkpoints.py --out runs/soup/last.pt runs/a/last.pt runs/b/last.pt runs/c/last.pt

Specs and card come from the first checkpoint; tune the decode of the result like any new model
(tools/export_onnx.py, then tools/tune_decode.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import EdgeError, report_user_error  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoints (.pt) of one architecture")
    p.add_argument("--out", required=True, help="averaged checkpoint to write")
    args = p.parse_args(argv)
    try:
        from toolchain.export.average import average_checkpoints

        out = average_checkpoints(args.checkpoints, args.out)
    except EdgeError as e:
        return report_user_error(e)
    print(f"averaged {len(args.checkpoints)} checkpoints: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
