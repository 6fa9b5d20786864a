"""CPU preprocessing benchmark: our OpenCV path vs the NumPy reference vs MONAI.

One 512x512 int16 CT frame -> 256x256 model input, lung window and a
3-window variant (lung, mediastinum, bone). The MONAI column is what a user
would otherwise write: HU conversion and padding mask in torch, then
``ScaleIntensityRange(clip=True)`` per window and ``Resize(mode="bilinear")``
on the channel-first tensor, CPU. Median per-frame time of each, side by side.

    PYTHONPATH=. python bench/preprocess_bench.py [--threads 1] [--out bench/results]

Writes preprocess_cpu.json and preprocess_cpu.md (machine, date, command, versions).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess.cpu import CpuPreprocessor
from edge.preprocess.reference import preprocess_frame_reference
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec
from bench.machine import machine_info

TARGET_SPEEDUP_VS_MONAI = 3.0


def synthetic_frame(size: int = 512, seed: int = 0) -> CTFrame:
    """Body ellipse with lungs, noise and bone specks; padding (-2000) outside the FOV circle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    hu = np.full((size, size), -1000.0)
    hu[((y - c) / (0.42 * size)) ** 2 + ((x - c) / (0.47 * size)) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        hu[((y - c) / (0.3 * size)) ** 2 + ((x - c - side * 0.2 * size) / (0.15 * size)) ** 2 <= 1] = -850.0
    hu += rng.normal(0, 25, hu.shape)
    hu[rng.random(hu.shape) < 0.002] = 1500.0
    stored = np.round(hu) + 1024  # stored with intercept -1024, as most scanners do
    stored[(y - c) ** 2 + (x - c) ** 2 > (size / 2) ** 2] = -2000
    return CTFrame(stored.astype(np.int16), 1.0, -1024.0, SliceGeometry(size, size, (0.7, 0.7), (0.0, 0.0, 0.0)),
                   padding=(-2000, -2000))


def monai_pipeline(spec: PreprocessSpec):
    """The equivalent MONAI/torch code; returns frame -> float32 ndarray (n_windows, H, W)."""
    import torch
    from monai.transforms import Resize, ScaleIntensityRange

    scalers = [ScaleIntensityRange(a_min=w.low, a_max=w.high, b_min=0.0, b_max=1.0, clip=True) for w in spec.windows]
    resize = Resize(spatial_size=(spec.out_height, spec.out_width), mode="bilinear")
    normalize = spec.mean != 0.0 or spec.std != 1.0

    def run(frame: CTFrame) -> np.ndarray:
        stored = torch.from_numpy(frame.pixels)
        hu = stored.to(torch.float32) * frame.rescale_slope + frame.rescale_intercept
        if frame.padding is not None:
            hu[(stored >= frame.padding[0]) & (stored <= frame.padding[1])] = spec.fill_hu
        image = hu[None]
        windows = torch.cat([scale(image) for scale in scalers], dim=0)
        out = resize(windows)
        if normalize:
            out = (out - spec.mean) / spec.std
        return out.as_tensor().numpy() if hasattr(out, "as_tensor") else np.asarray(out)

    return run


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def versions() -> dict:
    v = {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__}
    for name in ("torch", "monai"):
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = None
    return v


def run_variant(name: str, spec: PreprocessSpec, frame: CTFrame, repeats: int) -> dict:
    ours = CpuPreprocessor(spec)
    out = np.empty((len(spec.windows), spec.out_height, spec.out_width), np.float32)
    ref = preprocess_frame_reference(frame, spec)
    result = {
        "name": name,
        "windows": [w.name for w in spec.windows],
        "input": f"{frame.pixels.shape[0]}x{frame.pixels.shape[1]} {frame.pixels.dtype}",
        "output": f"{len(spec.windows)}x{spec.out_height}x{spec.out_width} float32",
        "ours_ms": median_ms(lambda: ours.preprocess_frame(frame, out=out), repeats),
        "reference_ms": median_ms(lambda: preprocess_frame_reference(frame, spec), max(5, repeats // 40), warmup=1),
        "ours_max_abs_err_vs_reference": float(np.abs(ours.preprocess_frame(frame) - ref).max()),
    }
    try:
        monai_run = monai_pipeline(spec)
    except ImportError as e:
        result["monai_ms"] = None
        result["monai_note"] = f"not run: {e}"
    else:
        result["monai_ms"] = median_ms(lambda: monai_run(frame), max(20, repeats // 4))
        result["monai_max_abs_err_vs_reference"] = float(np.abs(monai_run(frame) - ref).max())
    result["speedup_vs_reference"] = result["reference_ms"] / result["ours_ms"]
    if result["monai_ms"] is not None:
        result["speedup_vs_monai"] = result["monai_ms"] / result["ours_ms"]
        result["meets_target"] = result["speedup_vs_monai"] >= TARGET_SPEEDUP_VS_MONAI
    return result


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# CPU preprocessing benchmark",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads_used']} thread(s) used "
        f"(OpenCV and torch), load average at start {m.get('load_average_at_start')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- target: ours >= {TARGET_SPEEDUP_VS_MONAI:.0f}x faster than MONAI",
        "",
        "Median time per frame (ms), 512x512 int16 -> 256x256:",
        "",
        "| variant | ours (OpenCV) | NumPy reference (float64) | MONAI (torch CPU) | vs reference | vs MONAI | "
        "ours max err | MONAI max err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        monai = f"{r['monai_ms']:.3f}" if r["monai_ms"] is not None else "n/a"
        vs_monai = f"{r['speedup_vs_monai']:.1f}x" if r.get("speedup_vs_monai") else "n/a"
        monai_err = f"{r['monai_max_abs_err_vs_reference']:.1e}" if "monai_max_abs_err_vs_reference" in r else "n/a"
        lines.append(f"| {r['name']} ({', '.join(r['windows'])}) | {r['ours_ms']:.3f} | {r['reference_ms']:.2f} | "
                     f"{monai} | {r['speedup_vs_reference']:.0f}x | {vs_monai} | "
                     f"{r['ours_max_abs_err_vs_reference']:.1e} | {monai_err} |")
    lines += ["", "Errors are max abs differences from the float64 reference (unit range).", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="OpenCV and torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=2000, help="timed runs of our path (others fewer)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    cv2.setNumThreads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    frame = synthetic_frame()
    report = {
        "tool": "bench/preprocess_bench.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine_info(args.threads),
        "versions": versions(),
        "target_speedup_vs_monai": TARGET_SPEEDUP_VS_MONAI,
        "results": [],
    }
    windows3 = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"], WINDOW_PRESETS["bone"])
    for name, spec in [("lung", PreprocessSpec()), ("3-window", PreprocessSpec(windows=windows3))]:
        report["results"].append(run_variant(name, spec, frame, args.repeats))
        r = report["results"][-1]
        print(f"{name}: ours {r['ours_ms']:.3f} ms, reference {r['reference_ms']:.2f} ms, "
              f"monai {r['monai_ms'] if r['monai_ms'] is None else round(r['monai_ms'], 3)} ms", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "preprocess_cpu.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out_dir / "preprocess_cpu.md")
    print((out_dir / "preprocess_cpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
