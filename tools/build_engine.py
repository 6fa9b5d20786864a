#!/usr/bin/env python3
"""Build a TensorRT engine for a target: INT8 calibration first, then TensorRT (CLI over calib/ and engines/).

With --int8 every step before the build runs anywhere: calibration slices
(default: a phantom pool generated once under build/calib_pool), their
network inputs through the runtime's preprocessing, activation ranges, the
Q/DQ ONNX (TensorRT and ONNX Runtime CPU placements), the TensorRT calibration
cache and the Q/DQ rule check. Then the engine is built with TensorRT -- or,
where TensorRT is not installed, one line says so and the exit status is 3.

Exit status: 0 engine built or already up to date; 1 error (bad option or
input, failed check or build); 2 bad command line; 3 TensorRT missing here:
everything before the build was done, build the engine on the target.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from calib.data_loader import default_model  # noqa: E402
from calib.phantom_pool import DEFAULT_POOL_DIR, ensure_phantom_pool  # noqa: E402
from calib.pipeline import CalibrationSettings, calibrate  # noqa: E402
from calib.ranges import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS  # noqa: E402
from edge.errors import ConfigError, EdgeError, InputError, report_user_error  # noqa: E402
from engines.builder import (  # noqa: E402
    QUANTIZATION_KEY,
    BuildRequest,
    TensorRtNotInstalled,
    build_engine,
    model_interface,
)
from engines.recipe import list_recipes, load_recipe  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_TENSORRT = 0, 1, 2, 3
DEFAULT_TARGET = "orin-jp6"
DEFAULT_OUT = REPO / "engines" / "built"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    precision = p.add_mutually_exclusive_group(required=True)
    for name in ("int8", "fp16", "fp32"):
        precision.add_argument(f"--{name}", dest="precision", action="store_const", const=name,
                               help=f"build a {name.upper()} engine")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"build recipe in engines/recipes ({', '.join(list_recipes())}; default %(default)s)")
    p.add_argument("--onnx", help="FP32 ONNX model (default: edge/models/student.onnx, else teacher.onnx)")
    p.add_argument("--qdq-onnx", help="explicit INT8: use this Q/DQ ONNX instead of calibrating")
    p.add_argument("--calib-cache", help="implicit INT8 (DLA): use this calibration cache instead of calibrating")
    p.add_argument("--calib-pool", metavar="DIR",
                   help="folder of DICOM CT series to choose calibration slices from (default: phantom series "
                        f"generated once in {DEFAULT_POOL_DIR.relative_to(REPO)})")
    p.add_argument("--annotations", help="LUNA16 annotations.csv for the pool (default: the pool's own)")
    p.add_argument("--calib-size", type=int, default=300, metavar="N", help="calibration slices (default %(default)s)")
    p.add_argument("--calib-method", choices=METHODS, default=DEFAULT_METHOD,
                   help="activation range method (default %(default)s)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help="percentile of |x| for --calib-method percentile (default %(default)s)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the slice selection (default %(default)s)")
    p.add_argument("--dla-core", type=int, metavar="N", help="DLA core (DLA targets; GPU fallback stays on)")
    p.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace limit (default: the recipe's)")
    p.add_argument("--timing-cache", metavar="PATH", help="timing cache file (default: the recipe's)")
    p.add_argument("--opt-level", type=int, metavar="0-5", help="builder optimization level (TensorRT >= 8.6)")
    p.add_argument("--version-compatible", action="store_true", help="version-compatible plan (TensorRT >= 8.6)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even when every build input is unchanged")
    return p


def _quantization_info(onnx_path) -> dict:
    text = model_interface(onnx_path).metadata.get(QUANTIZATION_KEY)
    if text is None:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        raise InputError(onnx_path, f"metadata {QUANTIZATION_KEY} is not JSON") from None


def run(args) -> int:
    recipe = load_recipe(args.target).with_overrides(
        dla_core=args.dla_core, workspace_mib=args.workspace, timing_cache=args.timing_cache,
        builder_optimization_level=args.opt_level, version_compatible=True if args.version_compatible else None)
    precision = args.precision
    if precision not in recipe.precisions:
        raise ConfigError(f"--{precision}: target {recipe.name} builds {', '.join(recipe.precisions)} only")
    if args.calib_size < 1:
        raise ConfigError(f"--calib-size must be at least 1, got {args.calib_size}")
    onnx_path = Path(args.onnx) if args.onnx else default_model()
    if not onnx_path.is_file():
        raise InputError(onnx_path, "ONNX model not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    parse_onnx, cache, cal_sha, method = onnx_path, None, None, None
    if precision == "int8":
        if args.qdq_onnx or args.calib_cache:
            if recipe.int8_mode == "explicit" and not args.qdq_onnx:
                raise ConfigError(f"target {recipe.name} builds INT8 from a Q/DQ ONNX: "
                                  "give --qdq-onnx, not --calib-cache")
            if recipe.int8_mode == "implicit" and not args.calib_cache:
                raise ConfigError(f"target {recipe.name} builds INT8 from a calibration cache: give --calib-cache")
            if args.qdq_onnx:
                parse_onnx = Path(args.qdq_onnx)
                info = _quantization_info(parse_onnx)
                cal_sha, method = info.get("calibration_sha256"), info.get("method")
            else:
                cache = Path(args.calib_cache)
                if not cache.is_file():
                    raise InputError(cache, "calibration cache not found")
        else:
            pool = Path(args.calib_pool) if args.calib_pool else ensure_phantom_pool(DEFAULT_POOL_DIR)
            settings = CalibrationSettings(n=args.calib_size, method=args.calib_method, percentile=args.percentile,
                                           seed=args.calib_seed, trt_version=recipe.tensorrt)
            artifacts = calibrate(onnx_path, pool, out, settings, annotations=args.annotations)
            cal_sha, method = artifacts.calibration_sha256, artifacts.method
            if recipe.int8_mode == "explicit":
                parse_onnx = artifacts.qdq_onnx
            else:
                cache = artifacts.cache

    engine_path = out / f"{onnx_path.stem}.{recipe.name}.{precision}.engine"
    request = BuildRequest(parse_onnx, engine_path, recipe, precision, cache, cal_sha, method)
    try:
        result = build_engine(request, force=args.force, repo_root=REPO)
    except TensorRtNotInstalled:
        print(f"engine not built: TensorRT is not installed here; every step before the build is done (files in "
              f"{out}); build {engine_path.name} on the {recipe.name} target (TensorRT {recipe.tensorrt}) "
              f"[exit {EXIT_NO_TENSORRT}]", file=sys.stderr)
        return EXIT_NO_TENSORRT
    if result.rebuilt:
        print(f"built {result.engine_path} in {result.seconds:.1f} s ({result.reason}); "
              f"manifest beside it ({', '.join(result.manifest.flags)})")
    else:
        print(f"{result.engine_path}: {result.reason}, not rebuilt (--force to rebuild)")
    return EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EdgeError as exc:
        report_user_error(exc)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
