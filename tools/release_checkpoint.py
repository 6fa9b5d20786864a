#!/usr/bin/env python3
"""Make a small release copy of a training checkpoint (float16 weights, no optimizer state) to commit.

    python tools/release_checkpoint.py --checkpoint runs/teacher3/last.pt --out models/teacher/teacher.pt \\
        [--decode decode.json]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.errors import EdgeError, report_user_error  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", required=True, help="release checkpoint to write")
    p.add_argument("--decode", metavar="JSON", help="decode spec file to store instead of the checkpoint's")
    args = p.parse_args(argv)
    try:
        from edge.decode.spec import read_decode_spec
        from toolchain.export.release import release_checkpoint

        decode = read_decode_spec(args.decode) if args.decode else None
        out = release_checkpoint(args.checkpoint, args.out, decode)
    except EdgeError as e:
        return report_user_error(e)
    print(f"release checkpoint: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
