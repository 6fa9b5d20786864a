"""Check and time the fused CUDA preprocessing kernel on a GPU machine (via CuPy).

Needs numpy, opencv and cupy; no pydicom, torch or pycuda. Run from the repo root:

    PYTHONPATH=. python bench/gpu_preprocess_check.py --out OUT_DIR

Writes OUT_DIR/gpu_preprocess_check.json and .md: max abs error of the kernel
against the float64 reference for several specs (float32 <= 1e-5, float16 <=
1e-3 relative to max(1, |value|)), kernel times from CUDA events (median of
many runs; one frame per launch and a batch per launch), host-to-device upload
time and the CPU path time on the same machine. Exit status 1 when a check
fails, 2 when no GPU backend is usable. ``--dry-run`` replaces the GPU by a
NumPy emulation of the kernel (exercises packing, checks and reporting only).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from bench.machine import finish_check
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess import cuda_kernel
from edge.preprocess.cpu import CpuPreprocessor
from edge.preprocess.reference import preprocess_frame_reference
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

FP32_TOL = 1e-5
FP16_TOL = 1e-3  # relative to max(1, |reference|)
THREE_WINDOWS = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"], WINDOW_PRESETS["bone"])


def synthetic_frame(rows=512, cols=512, dtype=np.int16, seed=0, spacing=(0.7, 0.7)):
    """A CT-like slice: air outside a body ellipse, soft tissue, two lungs, noise, bone specks,
    padding outside the reconstruction circle. int16 stores HU directly; uint16 stores HU + 1024."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    hu = np.full((rows, cols), -1000.0)
    body = ((y - cy) / (0.42 * rows)) ** 2 + ((x - cx) / (0.47 * cols)) ** 2 <= 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((y - cy) / (0.3 * rows)) ** 2 + ((x - cx - side * 0.2 * cols) / (0.15 * cols)) ** 2 <= 1
        hu[lung] = -850.0
    hu += rng.normal(0, 25, hu.shape)
    hu[rng.random(hu.shape) < 0.002] = 1500.0
    fov = (y - cy) ** 2 + (x - cx) ** 2 <= (0.5 * min(rows, cols)) ** 2
    if dtype == np.int16:
        stored, intercept, padding = np.round(hu), 0.0, (-2000, -2000)
        stored[~fov] = -2000
    else:
        stored, intercept, padding = np.clip(np.round(hu + 1024), 0, None), -1024.0, (0, 0)
        stored[~fov] = 0
    return CTFrame(stored.astype(dtype), 1.0, intercept, SliceGeometry(rows, cols, spacing, (0.0, 0.0, 0.0)),
                   padding=padding)


def check_cases(quick: bool):
    """(name, spec, frames, channel_offset): channel_offset writes into a wider (1, C, H, W) buffer."""
    n = 2 if quick else 4
    size = 128 if quick else 512
    out = 64 if quick else 256
    cases = [
        ("lung_int16_f32", PreprocessSpec(out_height=out, out_width=out), [synthetic_frame(size, size)], None),
        ("lung_int16_f16", PreprocessSpec(out_height=out, out_width=out, dtype="float16"),
         [synthetic_frame(size, size)], None),
        ("3win_norm_uint16_f32", PreprocessSpec(windows=THREE_WINDOWS, out_height=out, out_width=out, mean=0.3,
                                                std=0.25), [synthetic_frame(size, size, np.uint16)], None),
        ("3win_norm_uint16_f16", PreprocessSpec(windows=THREE_WINDOWS, out_height=out, out_width=out, mean=0.3,
                                                std=0.25, dtype="float16"),
         [synthetic_frame(size, size, np.uint16)], None),
        ("physical_2mm_nonsquare_f32", PreprocessSpec(pixel_size_mm=2.0, out_height=out, out_width=out * 3 // 4),
         [synthetic_frame(size, size * 3 // 4)], None),
        ("upsample_f32", PreprocessSpec(out_height=out, out_width=out), [synthetic_frame(size // 4, size // 4)],
         None),
        ("batch_int16_f32", PreprocessSpec(out_height=out, out_width=out),
         [synthetic_frame(size, size, seed=s) for s in range(n)], None),
        ("channel_offset_2p5d_f32", PreprocessSpec(windows=THREE_WINDOWS, slices=3, out_height=out, out_width=out),
         [synthetic_frame(size, size)], 3),
    ]
    return cases


class CupyBackend:
    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy
        self._preprocessors = {}

    def device_info(self) -> dict:
        cp = self.cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion(),
            "cupy": cp.__version__,
        }

    def launcher(self, spec):
        key = spec.to_json()
        if key not in self._preprocessors:
            self._preprocessors[key] = cuda_kernel.CupyPreprocessor(spec)
        return self._preprocessors[key]

    def to_device(self, array):
        return self.cp.asarray(array)

    def full(self, shape, value, dtype):
        return self.cp.full(shape, value, dtype=dtype)

    def to_host(self, array):
        return self.cp.asnumpy(array)

    def launch(self, spec, src, dst, params, n_frames):
        self.launcher(spec).launch(src, dst, params, n_frames)

    def synchronize(self):
        self.cp.cuda.runtime.deviceSynchronize()

    def time_ms(self, fn, repeats: int, per_call: int = 1):
        """Median GPU time (CUDA events) of ``per_call`` back-to-back calls of ``fn``, divided by ``per_call``."""
        cp = self.cp
        for _ in range(10):
            fn()
        self.synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        samples = []
        for _ in range(repeats):
            start.record()
            for _ in range(per_call):
                fn()
            end.record()
            end.synchronize()
            samples.append(cp.cuda.get_elapsed_time(start, end) / per_call)
        return statistics.median(samples)


class EmulatedBackend:
    """--dry-run: the kernel emulated with NumPy from the packed parameters alone."""

    name = "numpy-emulation (dry run)"

    def device_info(self) -> dict:
        return {"name": "none (dry run)"}

    def to_device(self, array):
        return np.array(array)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    def to_host(self, array):
        return np.asarray(array)

    def synchronize(self):
        pass

    def launch(self, spec, src, dst, params, n_frames):
        p = params[0]
        flat = dst.reshape(-1)
        if not np.shares_memory(flat, dst):
            raise ValueError("emulated kernel needs a contiguous destination")
        rows_in, cols_in = int(p["src_rows"]), int(p["src_cols"])
        frames = src.reshape(n_frames, -1)
        out_r = np.arange(int(p["dst_rows"]))[:, None]
        out_c = np.arange(int(p["dst_cols"]))[None, :]
        y = out_r * float(p["scale_y"]) + float(p["offset_y"])
        x = out_c * float(p["scale_x"]) + float(p["offset_x"])
        inside = (y >= -0.5) & (y <= rows_in - 0.5) & (x >= -0.5) & (x <= cols_in - 0.5)
        y = np.clip(y, 0, rows_in - 1)
        x = np.clip(x, 0, cols_in - 1)
        y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
        y1, x1 = np.minimum(y0 + 1, rows_in - 1), np.minimum(x0 + 1, cols_in - 1)
        wy, wx = y - y0, x - x0
        for z in range(n_frames):
            img = frames[z].reshape(rows_in, -1)[:, :cols_in].astype(np.float64)
            hu = img * float(p["rescale_slope"]) + float(p["rescale_intercept"])
            if p["has_padding"]:
                hu[(img >= p["padding_low"]) & (img <= p["padding_high"])] = float(p["fill_hu"])
            for w in range(int(p["n_windows"])):
                low, inv = float(p["window_low"][w]), float(p["window_inv_width"][w])
                unit = np.clip((hu - low) * inv, 0, 1)
                top = unit[y0, x0] * (1 - wx) + unit[y0, x1] * wx
                bottom = unit[y1, x0] * (1 - wx) + unit[y1, x1] * wx
                value = np.where(inside, top * (1 - wy) + bottom * wy, np.clip((p["fill_hu"] - low) * inv, 0, 1))
                idx = (z * int(p["dst_frame_stride"]) + w * int(p["dst_channel_stride"])
                       + out_r * int(p["dst_row_stride"]) + out_c)
                flat[idx] = (value - float(p["mean"])) * float(p["inv_std"])

    def time_ms(self, fn, repeats: int, per_call: int = 1):
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(per_call):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / per_call)
        return statistics.median(samples)


def max_error(out: np.ndarray, ref: np.ndarray, dtype: str) -> float:
    err = np.abs(out.astype(np.float64) - ref)
    if dtype == "float16":
        err = err / np.maximum(1.0, np.abs(ref))
    return float(err.max())


def run_check(backend, name, spec, frames, channel_offset):
    pixels = np.stack([np.ascontiguousarray(f.pixels) for f in frames])
    src = backend.to_device(pixels)
    params = cuda_kernel.frame_params(frames[0], spec)
    plane_shape = (spec.out_height, spec.out_width)
    n_windows = len(spec.windows)
    sentinel = -12345.0
    if channel_offset is None:
        buffer = backend.full((len(frames), n_windows) + plane_shape, sentinel, spec.dtype)
        backend.launch(spec, src, buffer, params, len(frames))
        written = backend.to_host(buffer)
        untouched_ok = True
    else:
        buffer = backend.full((1, spec.channels) + plane_shape, sentinel, spec.dtype)
        backend.launch(spec, src, buffer[0, channel_offset:], params, 1)
        host = backend.to_host(buffer)
        written = host[:, channel_offset:channel_offset + n_windows]
        others = np.delete(host[0], np.s_[channel_offset:channel_offset + n_windows], axis=0)
        untouched_ok = bool(np.all(others == np.asarray(sentinel, dtype=spec.dtype)))
    backend.synchronize()
    ref = np.stack([preprocess_frame_reference(f, spec) for f in frames])
    err = max_error(written, ref, spec.dtype)
    cpu = np.stack([CpuPreprocessor(spec).preprocess_frame(f) for f in frames])
    err_cpu = float(np.abs(written.astype(np.float64) - cpu.astype(np.float64)).max())
    tol = FP16_TOL if spec.dtype == "float16" else FP32_TOL
    return {
        "name": name,
        "spec": json.loads(spec.to_json()),
        "input": f"{len(frames)} x {pixels.shape[1]}x{pixels.shape[2]} {pixels.dtype}",
        "kernel": cuda_kernel.kernel_name(pixels.dtype, spec.dtype),
        "max_abs_error_vs_reference": err,
        "max_abs_diff_vs_cpu_path": err_cpu,
        "tolerance": tol,
        "other_channels_untouched": untouched_ok,
        "passed": bool(err <= tol and untouched_ok),
    }


def run_timing(backend, quick: bool):
    repeats = 20 if quick else 200
    batch = 4 if quick else 32
    size, out = (128, 64) if quick else (512, 256)
    results = []
    for label, spec, dtype in [
        ("lung_f32", PreprocessSpec(out_height=out, out_width=out), np.int16),
        ("lung_f16", PreprocessSpec(out_height=out, out_width=out, dtype="float16"), np.int16),
        ("3win_f32", PreprocessSpec(windows=THREE_WINDOWS, out_height=out, out_width=out), np.int16),
    ]:
        frame = synthetic_frame(size, size, dtype)
        params = cuda_kernel.frame_params(frame, spec)
        src1 = backend.to_device(frame.pixels[None])
        dst1 = backend.full((1, len(spec.windows), out, out), 0, spec.dtype)
        srcb = backend.to_device(np.stack([frame.pixels] * batch))
        dstb = backend.full((batch, len(spec.windows), out, out), 0, spec.dtype)

        def one():
            backend.launch(spec, src1, dst1, params, 1)

        def many():
            backend.launch(spec, srcb, dstb, params, batch)

        host_pixels = np.ascontiguousarray(frame.pixels)
        cpu = CpuPreprocessor(spec)
        cpu_out = np.empty((len(spec.windows), out, out), np.float32)
        cpu_samples = []
        for i in range(12 if quick else 60):
            t0 = time.perf_counter()
            cpu.preprocess_frame(frame, out=cpu_out)
            if i >= 5:
                cpu_samples.append((time.perf_counter() - t0) * 1e3)
        kernel_1 = backend.time_ms(one, repeats)
        kernel_1_b2b = backend.time_ms(one, max(5, repeats // 10), per_call=20)
        kernel_batch = backend.time_ms(many, max(5, repeats // 4)) / batch
        upload = backend.time_ms(lambda: backend.to_device(host_pixels), max(5, repeats // 4))
        cpu_ms = statistics.median(cpu_samples)
        results.append({
            "name": label,
            "input": f"{size}x{size} {np.dtype(dtype).name} -> {len(spec.windows)}x{out}x{out} {spec.dtype}",
            "kernel_ms_single_launch_median": kernel_1,
            "kernel_ms_per_launch_back_to_back": kernel_1_b2b,
            "kernel_ms_per_frame_batch": kernel_batch,
            "batch": batch,
            "upload_ms_pageable_h2d": upload,
            "cpu_path_ms_median": cpu_ms,
            "speedup_cpu_over_kernel_single": cpu_ms / kernel_1 if kernel_1 > 0 else None,
        })
    return results


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# CUDA preprocessing kernel check",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- backend: {report['backend']}; device: {report['device'].get('name')}"
        + (f" (sm {report['device']['compute_capability']}, CUDA runtime {report['device']['cuda_runtime']},"
           f" cupy {report['device']['cupy']})" if "cupy" in report["device"] else ""),
        f"- host: {report['host']['cpu']} ({report['host']['cores']} cores), "
        f"OpenCV threads {report['host']['cv2_threads']}",
        f"- result: **{'PASS' if report['passed'] else 'FAIL'}**",
        "",
        "## Accuracy against the float64 reference",
        "",
        "| case | kernel | input | max abs err | tol | vs CPU path | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        if "error" in c:
            lines.append(f"| {c['name']} | | | error: {c['error']} | | | FAIL |")
            continue
        lines.append(f"| {c['name']} | {c['kernel']} | {c['input']} | {c['max_abs_error_vs_reference']:.2e} | "
                     f"{c['tolerance']:.0e} | {c['max_abs_diff_vs_cpu_path']:.2e} | "
                     f"{'yes' if c['passed'] else 'NO'} |")
    lines += ["", "float16 errors are relative to max(1, |reference|).", ""]
    if report.get("timing"):
        lines += [
            "## Timing (median; CUDA events)",
            "",
            "| case | input -> output | kernel 1 frame (ms) | back-to-back (ms) | per frame in batch (ms) | "
            "H2D upload (ms) | CPU path (ms) | CPU / kernel |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in report["timing"]:
            lines.append(
                f"| {t['name']} | {t['input']} | {t['kernel_ms_single_launch_median']:.4f} | "
                f"{t['kernel_ms_per_launch_back_to_back']:.4f} | {t['kernel_ms_per_frame_batch']:.4f} "
                f"(batch {t['batch']}) | {t['upload_ms_pageable_h2d']:.4f} | {t['cpu_path_ms_median']:.3f} | "
                f"{t['speedup_cpu_over_kernel_single']:.1f}x |")
        lines += ["", "'kernel 1 frame' brackets a single launch with events (includes launch latency);",
                  "'back-to-back' divides 20 consecutive launches; 'batch' is one launch over the batch (grid z).", ""]
    if report.get("errors"):
        lines += ["## Errors", "", "```", *report["errors"], "```", ""]
    path.write_text("\n".join(lines))


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import cv2

    return {"cpu": cpu, "cores": os.cpu_count(), "cv2_threads": cv2.getNumThreads(),
            "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_preprocess_check.json and .md")
    parser.add_argument("--dry-run", action="store_true", help="emulate the kernel with NumPy (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="small frames and few repeats")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    report = {
        "tool": "bench/gpu_preprocess_check.py",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "host": host_info(),
        "checks": [],
        "timing": [],
        "errors": [],
    }
    status = 0
    try:
        backend = EmulatedBackend() if args.dry_run else CupyBackend()
        report["backend"] = backend.name
        report["device"] = backend.device_info()
    except Exception:  # no usable GPU backend: still write the report
        report["backend"], report["device"] = "none", {"name": "unavailable"}
        report["errors"].append(traceback.format_exc())
        backend, status = None, 2

    if backend is not None:
        for name, spec, frames, channel_offset in check_cases(args.quick):
            try:
                report["checks"].append(run_check(backend, name, spec, frames, channel_offset))
            except Exception as e:  # record and go on with the other cases
                report["checks"].append({"name": name, "error": f"{type(e).__name__}: {e}", "passed": False})
                report["errors"].append(traceback.format_exc())
            c = report["checks"][-1]
            print(f"{name}: {'ok' if c['passed'] else 'FAIL'} "
                  f"{c.get('max_abs_error_vs_reference', c.get('error'))}", flush=True)
        try:
            report["timing"] = run_timing(backend, args.quick)
        except Exception:
            report["errors"].append(traceback.format_exc())
    return finish_check(report, status, out_dir, "gpu_preprocess_check", write_markdown)


if __name__ == "__main__":
    sys.exit(main())
