#!/usr/bin/env python3
"""Make a signed model update bundle for field devices (CLI over edge.update.packaging).

  package_update.py --onnx student_qdq.onnx --key keys/update_key.pem --version 1.3.0 --release 8 \\
      --targets cpu,jetson-orin --tensorrt-min 10.3 --tensorrt-below 11 --calib-cache calib.cache \\
      --recipe int8.json --out student-1.3.0.bundle.tar.gz
  package_update.py keygen --out keys/
  package_update.py rotate --key keys/update_key.pem --add new/update_key.pub.pem \\
      --revoke OLD_KEY_ID --sequence 1 --out rotation.json

See docs/updates.md for the bundle format, keys and the device side.
"""

import argparse
import sys

from edge.errors import ConfigError, EdgeError, report_user_error



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="the model: Q/DQ or FP32 ONNX with embedded specs")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM) to sign with")
    p.add_argument("--version", required=True, help="semantic version, e.g. 1.3.0")
    p.add_argument("--release", required=True, type=int, help="release counter, above every earlier bundle's")
    p.add_argument("--out", required=True, help="bundle file to write (.tar.gz, or .tar with --no-compress)")
    p.add_argument("--calib-cache", help="INT8 calibration cache for the device's engine build")
    p.add_argument("--recipe", help="engine build recipe")
    p.add_argument("--golden", help="golden vectors .npz (default: made from a phantom series with this model)")
    p.add_argument("--golden-inputs", type=int, default=4, help="inputs to make golden vectors from (default %(default)s)")
    p.add_argument("--golden-seed", type=int, default=0, help="phantom seed for the golden vectors (default %(default)s)")
    p.add_argument("--expires-days", type=float, default=90.0, help="days until the bundle expires (default %(default)s)")
    p.add_argument("--targets", default="cpu",
                   help="comma-separated hardware tags; 'cpu' = any ONNX Runtime device (default %(default)s)")
    p.add_argument("--tensorrt-min", help="lowest TensorRT version the engine may be built with, e.g. 10.3")
    p.add_argument("--tensorrt-below", help="first TensorRT version that may not build it, e.g. 11")
    p.add_argument("--min-runtime", help="lowest device runtime version (default: this runtime's)")
    p.add_argument("--model-name", help="model name in the manifest (default: the model card's name)")
    p.add_argument("--rotation", help="key rotation statement to deliver with the bundle")
    for name, help_ in (("heatmap-atol", "max abs heatmap difference"), ("score-atol", "finding score tolerance"),
                        ("position-px", "finding position tolerance, model-input pixels"),
                        ("diameter-rel", "finding diameter tolerance, relative")):
        p.add_argument(f"--{name}", type=float, help=f"golden check: {help_}")
    p.add_argument("--no-compress", action="store_true", help="write a plain tar")
    return p


def keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="package_update.py keygen",
                                description="Make an Ed25519 signing key pair and a trust store holding its public key.")
    p.add_argument("--out", required=True, help="folder for update_key.pem, update_key.pub.pem, trusted_keys.json")
    return p


def rotate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="package_update.py rotate",
                                description="Make a key rotation statement signed by a key the devices trust now.")
    p.add_argument("--key", required=True, help="private key the devices trust now (signs the statement)")
    p.add_argument("--sequence", required=True, type=int, help="rotation number, above every earlier one")
    p.add_argument("--add", action="append", default=[], metavar="PUBLIC_PEM", help="public key to trust (repeatable)")
    p.add_argument("--revoke", action="append", default=[], metavar="KEY_ID", help="key id to stop trusting (repeatable)")
    p.add_argument("--out", required=True, help="statement file to write")
    return p


def run_package(args) -> str:
    from edge.update.manifest import TensorRTRange
    from edge.update.packaging import package_bundle
    from edge.update.signing import load_private_key

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.tensorrt_below and not args.tensorrt_min:
        raise ConfigError("--tensorrt-below needs --tensorrt-min")
    trt = TensorRTRange(args.tensorrt_min, args.tensorrt_below) if args.tensorrt_min else None
    if trt is not None and targets == ["cpu"]:
        raise ConfigError("--tensorrt-min given but --targets names no TensorRT hardware (e.g. jetson-orin)")
    tolerances = {k: v for k, v in (("heatmap_atol", args.heatmap_atol), ("score_atol", args.score_atol),
                                    ("position_px", args.position_px), ("diameter_rel", args.diameter_rel))
                  if v is not None}
    if args.golden_inputs < 1:
        raise ConfigError(f"--golden-inputs must be at least 1, got {args.golden_inputs}")
    result = package_bundle(
        args.out, args.onnx, load_private_key(args.key), args.version, args.release, hardware=targets, tensorrt=trt,
        min_runtime_version=args.min_runtime, expires_days=args.expires_days, calibration_cache=args.calib_cache,
        recipe=args.recipe, golden=args.golden, golden_inputs=args.golden_inputs, golden_seed=args.golden_seed,
        tolerances=tolerances, model_name=args.model_name, rotation=args.rotation, compress=not args.no_compress,
    )
    m = result.manifest
    lines = [f"wrote {args.out}: {m.model} {m.version} release {m.release}, signed by key {m.key_id}, "
             f"expires {m.expires}",
             f"  targets {', '.join(m.targets.hardware)}"
             + (f", TensorRT {m.targets.tensorrt.format()}" if m.targets.tensorrt else ""),
             f"  golden: {len(result.golden)} input(s), {sum(len(p) for p in result.golden.peaks)} finding(s)"]
    lines += [f"  {name}: {e.size} bytes sha256 {e.sha256[:16]}..." for name, e in m.files.items()]
    return "\n".join(lines + [f"  note: {n}" for n in result.notes])


def run_keygen(args) -> str:
    from edge.update.signing import generate_keypair, load_public_key

    private, public, store = generate_keypair(args.out)
    return (f"key {load_public_key(public).key_id}: private {private} (keep it off devices), public {public}, "
            f"trust store for devices {store}")


def run_rotate(args) -> str:
    from pathlib import Path

    from edge.update.signing import load_private_key, load_public_key, make_rotation

    if not args.add and not args.revoke:
        raise ConfigError("a rotation needs --add and/or --revoke")
    signer = load_private_key(args.key)
    added = [load_public_key(p) for p in args.add]
    Path(args.out).write_bytes(make_rotation(signer, args.sequence, added, args.revoke))
    return (f"wrote {args.out}: rotation {args.sequence} signed by {signer.key_id}, "
            f"adds {', '.join(k.key_id for k in added) or 'none'}, revokes {', '.join(args.revoke) or 'none'}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "keygen":
        action, args = run_keygen, keygen_parser().parse_args(argv[1:])
    elif argv and argv[0] == "rotate":
        action, args = run_rotate, rotate_parser().parse_args(argv[1:])
    else:
        action, args = run_package, build_parser().parse_args(argv)
    try:
        print(action(args))
    except EdgeError as exc:
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
