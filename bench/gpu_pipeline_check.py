"""Check the zero-copy GPU slice pipeline on a GPU machine, without TensorRT.

Exercises ``edge.gpu`` (pycuda context, mapped / pinned frame buffers,
double-buffered slots with events) and the fused preprocessing kernel through
``CudaPreprocessor``, writing into a device buffer that stands in for the
TensorRT input binding. A stand-in "model" copies that binding to the output
buffer (a device-to-device copy on the same stream), so what comes back is
exactly what TensorRT would have read. TensorRT itself is NOT exercised here.

pycuda is usually missing on the lent machine and nothing can be downloaded
there, so the script installs it from ``.dev/`` (carried with the repo):
a prebuilt ``.dev/wheels/pycuda-*.whl`` for this Python if one imports, else it
builds ``.dev/pycuda/pycuda-*.tar.gz`` with the local nvcc/CUDA headers; the
pure-Python needs (pytools, platformdirs, mako, siphash24) come from
``.dev/wheels``. Everything goes to ``--site`` (default /tmp/pycuda-site).

Run from the repo root:

    PYTHONPATH=. python3 bench/gpu_pipeline_check.py --out OUT_DIR

Writes OUT_DIR/gpu_pipeline_check.json and .md. Exit status 1 when a check
fails, 2 when pycuda or the GPU is unusable. ``--build-pycuda-wheel DIR`` only
builds the pycuda wheel (no GPU needed; this is how the carried wheel is made).
"""

import argparse
import datetime
import glob
import importlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import finish_check  # noqa: E402

PYCUDA_RUNTIME_NEEDS = ("pytools", "platformdirs", "mako", "siphash24")

# ----------------------------------------------------------------------------------------------
# pycuda from .dev/ (no network on the lent machine)


def _run(cmd, log, cwd=None, env=None):
    log.append("$ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    log.append((r.stdout + r.stderr)[-4000:])
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(str(c) for c in cmd)}\n"
                           f"{(r.stdout + r.stderr)[-3000:]}")
    return r


def cuda_root() -> Path:
    """The CUDA toolkit folder: the first of nvcc's (symlinks followed), $CUDA_HOME, $CUDA_PATH,
    /usr/local/cuda that holds include/cuda.h."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1])
    candidates += [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if p]
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        if (candidate / "include" / "cuda.h").exists() and (candidate / "bin" / "nvcc").exists():
            return candidate
    raise RuntimeError("no CUDA toolkit found (looked for include/cuda.h and bin/nvcc in "
                       + ", ".join(str(c) for c in candidates) + ")")


def libcuda_link_dir(root: Path, work: Path, log) -> Path:
    """A folder with a linkable libcuda.so: the toolkit's stubs, the driver's library,
    or (no driver here, e.g. a build machine) an empty stub with the driver's soname;
    the build links with --no-as-needed so that the stub still leaves NEEDED libcuda.so.1."""
    dirs = [root / "lib64" / "stubs", root / "lib" / "stubs"] + [Path(p) for p in glob.glob(str(root / "targets/*/lib/stubs"))]
    for d in dirs:
        if (d / "libcuda.so").exists():
            log.append(f"libcuda for linking: {d}/libcuda.so")
            return d
    link_dir = work / "libcuda-link"
    link_dir.mkdir(parents=True, exist_ok=True)
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib",
              "/usr/lib/aarch64-linux-gnu/tegra", "/usr/lib/aarch64-linux-gnu", "/usr/lib/wsl/lib"):
        for name in ("libcuda.so", "libcuda.so.1"):
            if (Path(d) / name).exists():
                target = link_dir / "libcuda.so"
                if target.exists() or target.is_symlink():
                    target.unlink()
                target.symlink_to(Path(d) / name)
                log.append(f"libcuda for linking: {d}/{name}")
                return link_dir
    stub_c = link_dir / "stub.c"
    stub_c.write_text("/* empty: symbols resolve from the driver's libcuda.so.1 at import */\n")
    _run(["gcc", "-shared", "-fPIC", "-o", link_dir / "libcuda.so", "-Wl,-soname,libcuda.so.1", stub_c], log)
    log.append("libcuda for linking: empty stub (no driver library on this machine)")
    return link_dir


def build_pycuda_wheel(sdist: Path, wheel_dir: Path, log) -> Path:
    """Build the pycuda sdist into a wheel for this Python (no network: numpy/setuptools/wheel
    must be installed). CURAND is left out (not used; not every toolkit ships it)."""
    root = cuda_root()
    work = Path(tempfile.mkdtemp(prefix="pycuda-build-"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data") if sys.version_info >= (3, 12) else tar.extractall(work)
    src = next(p for p in work.iterdir() if p.is_dir() and (p / "setup.py").exists())
    link_dir = libcuda_link_dir(root, work, log)
    _run([sys.executable, "configure.py", f"--cuda-root={root}", "--no-cuda-enable-curand",
          f"--cudadrv-lib-dir={link_dir}"], log, cwd=src)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    # LDFLAGS from the environment go before the objects and -lcuda on the link line
    # (setuptools puts extra_link_args after them, too late for --no-as-needed).
    env = dict(os.environ, LDFLAGS=(os.environ.get("LDFLAGS", "") + " -Wl,--no-as-needed").strip())
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", wheel_dir, src], log, env=env)
    wheels = sorted(wheel_dir.glob("pycuda-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise RuntimeError(f"pip wheel produced no pycuda wheel in {wheel_dir}")
    return wheels[-1]


def _pip_install_target(wheels, site: Path, log) -> None:
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
          "--no-cache-dir", "--upgrade", "--target", site] + [str(w) for w in wheels], log)


def _try_import_pycuda(site: Path):
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    for name in list(sys.modules):
        if name == "pycuda" or name.startswith("pycuda."):
            del sys.modules[name]
    import pycuda.driver  # noqa: F401  (the compiled part: fails if the wheel does not fit)

    return pycuda.driver


def ensure_pycuda(dev_dir: Path, site: Path, log) -> str:
    """Import pycuda, installing it from ``dev_dir`` into ``site`` if needed; returns how."""
    try:
        import pycuda.driver  # noqa: F401

        return "preinstalled"
    except ImportError:
        pass
    wheels_dir = dev_dir / "wheels"
    needs = []
    for name in PYCUDA_RUNTIME_NEEDS:
        try:
            importlib.import_module(name)
        except ImportError:
            found = sorted(wheels_dir.glob(f"{name}-*.whl"))
            if not found:
                raise RuntimeError(f"{name} is not installed and no {name}-*.whl is in {wheels_dir}") from None
            needs.append(found[-1])
    if needs:
        _pip_install_target(needs, site, log)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    for wheel in sorted(wheels_dir.glob(f"pycuda-*-{tag}-*.whl")):
        try:
            _pip_install_target([wheel], site, log)
            _try_import_pycuda(site)
            return f"prebuilt wheel {wheel.name}"
        except (RuntimeError, ImportError) as e:
            log.append(f"prebuilt {wheel.name} unusable here, building from source: {e}")
    sdists = sorted((dev_dir / "pycuda").glob("pycuda-*.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pycuda is not installed and there is no pycuda-*.tar.gz in {dev_dir / 'pycuda'}")
    t0 = time.perf_counter()
    wheel = build_pycuda_wheel(sdists[-1], Path(tempfile.mkdtemp(prefix="pycuda-wheel-")), log)
    _pip_install_target([wheel], site, log)
    _try_import_pycuda(site)
    return f"built from {sdists[-1].name} in {time.perf_counter() - t0:.0f} s"


# ----------------------------------------------------------------------------------------------
# Checks (pycuda imported by now)

FP32_TOL = 1e-5
FP16_TOL = 1e-3  # relative to max(1, |reference|), as in bench/gpu_preprocess_check.py

SPIN_SOURCE = r"""
extern "C" __global__ void spin_ns(unsigned long long ns)
{
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


def synthetic_series(n, rows=512, cols=512, dtype=np.int16, vary_intercept=False, seed=0):
    """CT-like slices: body ellipse, two lungs, noise, bone specks, padding outside the FOV circle."""
    from edge.frame import CTFrame
    from edge.geometry import SliceGeometry

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    fov = (y - cy) ** 2 + (x - cx) ** 2 <= (0.5 * min(rows, cols)) ** 2
    out = []
    for i in range(n):
        hu = np.full((rows, cols), -1000.0)
        hu[((y - cy) / (0.42 * rows)) ** 2 + ((x - cx) / (0.47 * cols)) ** 2 <= 1] = 40.0
        r = 0.28 + 0.04 * np.sin(i / 5.0)
        for side in (-1, 1):
            hu[((y - cy) / (r * rows)) ** 2 + ((x - cx - side * 0.2 * cols) / (0.15 * cols)) ** 2 <= 1] = -850.0
        hu += rng.normal(0, 25, hu.shape)
        hu[rng.random(hu.shape) < 0.002] = 1500.0
        shift = 8.0 * (i % 3) if vary_intercept else 0.0  # per-slice rescale intercept: non-uniform launches
        if dtype == np.int16:  # stored = HU - intercept; padding -2000 outside the FOV
            intercept, padding = -shift, (-2000, -2000)
            stored = np.round(hu - intercept)
            stored[~fov] = -2000
        else:  # uint16: stored = HU + 1024 (+ shift); padding 0
            intercept, padding = -1024.0 - shift, (0, 0)
            stored = np.clip(np.round(hu - intercept), 1, None)
            stored[~fov] = 0
        geometry = SliceGeometry(rows, cols, (0.7, 0.7), (0.0, 0.0, 1.25 * i))
        out.append(CTFrame(stored.astype(dtype), 1.0, intercept, geometry, padding=padding))
    return out


class CopyThenSpinModel:
    """Stand-in for TensorRT (NOT TensorRT): output 'planes' = the input binding, copied device-to-device
    on the pipeline's stream, then a kernel that spins for ``spin_ms`` (an inference-sized GPU delay)."""

    input_name = "input"

    def __init__(self, driver, chw, dtype, spin_ms=0.0):
        from pycuda.compiler import SourceModule

        self.driver, self.chw, self.dtype, self.spin_ns = driver, tuple(chw), np.dtype(dtype), int(spin_ms * 1e6)
        self._spin = SourceModule(SPIN_SOURCE, no_extern_c=True).get_function("spin_ns") if self.spin_ns else None

    def input_binding(self):
        return self.chw, self.dtype

    def output_shapes(self, batch):
        return {"planes": ((batch,) + self.chw, self.dtype)}

    def enqueue_device(self, batch, input_ptr, output_ptrs, stream):
        nbytes = batch * int(np.prod(self.chw)) * self.dtype.itemsize
        self.driver.memcpy_dtod_async(output_ptrs["planes"], input_ptr, nbytes, stream)
        if self._spin is not None:
            self._spin(np.uint64(self.spin_ns), block=(1, 1, 1), grid=(1, 1, 1), stream=stream)


def max_error(out, ref, dtype) -> float:
    err = np.abs(out.astype(np.float64) - ref)
    if np.dtype(dtype) == np.float16:
        err = err / np.maximum(1.0, np.abs(ref))
    return float(err.max())


def reference_stacks(series, spec):
    from edge.preprocess.reference import preprocess_frame_reference

    planes = [preprocess_frame_reference(f, spec) for f in series]
    half, n = spec.slices // 2, len(series)
    return np.stack([np.concatenate([planes[min(max(i + s - half, 0), n - 1)] for s in range(spec.slices)])
                     for i in range(n)])


def check_cuda_preprocessor(driver, quick):
    """The public pycuda path: CudaPreprocessor.preprocess_frame into a device buffer at a channel offset."""
    from edge.preprocess.cuda_kernel import CudaPreprocessor
    from edge.preprocess.reference import preprocess_frame_reference
    from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

    size, out = (128, 64) if quick else (512, 256)
    windows = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"], WINDOW_PRESETS["bone"])
    results = []
    for dtype in ("float32", "float16"):
        spec = PreprocessSpec(windows=windows, slices=3, out_height=out, out_width=out, mean=0.3, std=0.25,
                              dtype=dtype)
        frame = synthetic_series(1, size, size, np.uint16)[0]
        sentinel = np.full((1, spec.channels, out, out), -12345.0, dtype)
        dst = driver.mem_alloc(sentinel.nbytes)
        driver.memcpy_htod(dst, sentinel)
        stream = driver.Stream()
        CudaPreprocessor(spec).preprocess_frame(frame, int(dst), channel_offset=3, stream=stream)
        stream.synchronize()
        got = np.empty_like(sentinel)
        driver.memcpy_dtoh(got, dst)
        dst.free()
        ref = preprocess_frame_reference(frame, spec)
        err = max_error(got[0, 3:6], ref, dtype)
        untouched = bool(np.all(np.delete(got[0], np.s_[3:6], axis=0) == sentinel[0, 0, 0, 0]))
        tol = FP16_TOL if dtype == "float16" else FP32_TOL
        results.append({"name": f"CudaPreprocessor.preprocess_frame_{dtype}", "max_error": err, "tolerance": tol,
                        "other_channels_untouched": untouched, "passed": bool(err <= tol and untouched)})
    return results


def check_pipeline(driver, ctx, quick):
    """GpuSlicePipeline end to end (stand-in model) against the float64 reference, per host-memory mode."""
    from edge.gpu.pipeline import GpuSlicePipeline
    from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

    size, out, n = (128, 64, 7) if quick else (512, 256, 11)
    results = []
    cases = [
        ("3win_2p5d_int16_f32", dict(windows=(WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"],
                                              WINDOW_PRESETS["bone"]), slices=3, dtype="float32"), np.int16, False),
        ("lung_2p5d_uint16_f16", dict(slices=3, dtype="float16", mean=0.3, std=0.25), np.uint16, False),
        ("lung_5slices_varying_rescale_f32", dict(slices=5, dtype="float32"), np.int16, True),
    ]
    for mode in ("mapped", "pinned"):
        for name, spec_args, src_dtype, vary in cases:
            spec = PreprocessSpec(out_height=out, out_width=out, **spec_args)
            series = synthetic_series(n, size, size, src_dtype, vary_intercept=vary)
            model = CopyThenSpinModel(driver, (spec.channels, out, out), spec.dtype)
            pipeline = GpuSlicePipeline(model, spec, ctx.properties, max_batch=4, host_memory=mode)
            try:
                results_iter = list(pipeline.run(series))
            finally:
                pipeline.close()
            got = np.concatenate([r.outputs["planes"] for r in results_iter])
            ref = reference_stacks(series, spec)
            err = max_error(got, ref, spec.dtype)
            tol = FP16_TOL if spec.dtype == "float16" else FP32_TOL
            order_ok = [(r.first_center, r.count) for r in results_iter] == [
                (i, min(4, n - i)) for i in range(0, n, 4)]
            results.append({"name": f"pipeline_{mode}_{name}", "host_memory": mode, "frames": n,
                            "input": f"{n} x {size}x{size} {np.dtype(src_dtype).name}",
                            "output": f"({n}, {spec.channels}, {out}, {out}) {spec.dtype}",
                            "max_error": err, "tolerance": tol, "batches_in_order": order_ok,
                            "passed": bool(err <= tol and order_ok and got.shape == ref.shape)})
    return results


def time_overlap(driver, ctx, quick, spin_ms):
    """Wall time per slice with one slot (decode, then GPU, then decode...) and with two slots
    (decode of batch k+1 while the GPU runs batch k). Decode = zlib-inflating the stored pixels
    (as a Deflated transfer syntax would) into the slot's frame run."""
    import zlib

    from edge.gpu.pipeline import GpuSlicePipeline
    from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

    n, size, out, batch = (24, 256, 128, 4) if quick else (96, 512, 256, 8)
    spec = PreprocessSpec(windows=(WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"]), slices=3,
                          out_height=out, out_width=out, dtype="float16")
    series = synthetic_series(n, size, size, np.int16)
    compressed = [zlib.compress(f.pixels.tobytes(), 6) for f in series]

    def inflate(index, out_view):
        out_view[...] = np.frombuffer(zlib.decompress(compressed[index]), np.int16).reshape(out_view.shape)

    rows = []
    for mode in ("mapped", "pinned"):
        for slots in (1, 2):
            model = CopyThenSpinModel(driver, (spec.channels, out, out), spec.dtype, spin_ms)
            pipeline = GpuSlicePipeline(model, spec, ctx.properties, max_batch=batch, host_memory=mode,
                                        n_slots=slots)
            try:
                list(pipeline.run(series[:batch * 2], fill_frame=inflate))  # warm-up (module load, first touch)
                walls, stage = [], {"fill": [], "preprocess": [], "infer": [], "copy_out": []}
                for _ in range(2 if quick else 5):
                    t0 = time.perf_counter()
                    results = list(pipeline.run(series, fill_frame=inflate))
                    walls.append((time.perf_counter() - t0) * 1e3 / n)
                    for r in results:
                        for key in stage:
                            stage[key].append(r.timings_ms[key])
            finally:
                pipeline.close()
            rows.append({
                "host_memory": mode, "slots": slots, "batch": batch,
                "wall_ms_per_slice_median": statistics.median(walls),
                "fill_ms_per_batch_median": statistics.median(stage["fill"]),
                "preprocess_ms_per_batch_median": statistics.median(stage["preprocess"]),
                "infer_standin_ms_per_batch_median": statistics.median(stage["infer"]),
                "copy_out_ms_per_batch_median": statistics.median(stage["copy_out"]),
            })
    for row in rows:
        serial = next(r for r in rows if r["host_memory"] == row["host_memory"] and r["slots"] == 1)
        row["speedup_vs_one_slot"] = serial["wall_ms_per_slice_median"] / row["wall_ms_per_slice_median"]
    return {"frames": n, "input": f"{size}x{size} int16 (zlib-compressed)",
            "output": f"{spec.channels}x{out}x{out} {spec.dtype}", "standin_spin_ms": spin_ms, "rows": rows}


def write_markdown(report, path: Path) -> None:
    dev = report.get("device", {})
    lines = [
        "# GPU slice pipeline check (pycuda, fused kernel, double buffering; no TensorRT)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- device: {dev.get('name')} (sm {dev.get('compute_capability')}, integrated: {dev.get('integrated')}, "
        f"can map host memory: {dev.get('can_map_host_memory')}), CUDA driver {dev.get('cuda_driver')}",
        f"- pycuda: {report.get('pycuda')}",
        f"- result: **{'PASS' if report['passed'] else 'FAIL'}**",
        "",
        "TensorRT is not installed on this machine: a stand-in model copies the input binding to the",
        "output (device-to-device, same stream) and spins for a set time. What is checked is everything",
        "around TensorRT: mapped / pinned frame buffers, the kernel writing into the binding at each",
        "slice's channel offset, events and slot reuse.",
        "",
        "## Accuracy against the float64 reference",
        "",
        "| check | max error | tol | ok |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        if "error" in c:
            lines.append(f"| {c['name']} | error: {c['error']} | | FAIL |")
        else:
            lines.append(f"| {c['name']} | {c['max_error']:.2e} | {c['tolerance']:.0e} | "
                         f"{'yes' if c['passed'] else 'NO'} |")
    lines += ["", "float16 errors are relative to max(1, |reference|).", ""]
    timing = report.get("overlap")
    if timing:
        lines += [
            f"## Decode / GPU overlap ({timing['frames']} slices {timing['input']} -> {timing['output']}, "
            f"stand-in inference {timing['standin_spin_ms']} ms per batch)",
            "",
            "| host memory | slots | batch | wall ms/slice | fill (decode) ms/batch | preprocess ms/batch "
            "| stand-in infer ms/batch | copy out ms/batch | speedup vs 1 slot |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in timing["rows"]:
            lines.append(f"| {r['host_memory']} | {r['slots']} | {r['batch']} | {r['wall_ms_per_slice_median']:.3f} "
                         f"| {r['fill_ms_per_batch_median']:.3f} | {r['preprocess_ms_per_batch_median']:.3f} | "
                         f"{r['infer_standin_ms_per_batch_median']:.3f} | {r['copy_out_ms_per_batch_median']:.3f} | "
                         f"{r['speedup_vs_one_slot']:.2f}x |")
        lines += ["", "GPU stage times come from CUDA events; 'preprocess' includes the H2D copy in pinned mode.",
                  "'fill' is host time (inflate + write into the slot's frame run). On a discrete GPU 'mapped'",
                  "makes the kernel read frames over PCIe; on Jetson it is the zero-copy default.", ""]
    if report.get("errors"):
        lines += ["## Errors", "", "```", *report["errors"], "```", ""]
    if report.get("bootstrap_log"):
        lines += ["## pycuda install log (tail)", "", "```", report["bootstrap_log"][-3000:], "```", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for gpu_pipeline_check.json and .md")
    parser.add_argument("--dev-dir", default=str(REPO / ".dev"), help="pycuda sdist and wheels (default .dev)")
    parser.add_argument("--site", default="/tmp/pycuda-site", help="where pycuda is installed if missing")
    parser.add_argument("--quick", action="store_true", help="small frames and few repeats")
    parser.add_argument("--spin-ms", type=float, default=10.0,
                        help="GPU time of the stand-in inference per batch (default 10.0)")
    parser.add_argument("--build-pycuda-wheel", metavar="DIR",
                        help="only build the pycuda wheel from --dev-dir/pycuda into DIR (no GPU needed)")
    args = parser.parse_args(argv)
    log = []
    if args.build_pycuda_wheel:
        sdists = sorted((Path(args.dev_dir) / "pycuda").glob("pycuda-*.tar.gz"))
        if not sdists:
            print(f"no pycuda-*.tar.gz in {Path(args.dev_dir) / 'pycuda'}", file=sys.stderr)
            return 2
        try:
            print(build_pycuda_wheel(sdists[-1], Path(args.build_pycuda_wheel), log))
            return 0
        finally:
            print("\n".join(log)[-3000:], file=sys.stderr)
    if not args.out:
        parser.error("--out is required")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "tool": "bench/gpu_pipeline_check.py",
        "command": " ".join([os.path.basename(sys.executable)] + (sys.argv if argv is None else ["<main>"] + argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "numpy": np.__version__, "cores": os.cpu_count()},
        "checks": [], "errors": [],
    }
    status = 0
    ctx = None
    try:
        try:
            os.environ["PATH"] = str(cuda_root() / "bin") + os.pathsep + os.environ.get("PATH", "")
        except RuntimeError as e:
            log.append(str(e))
        t0 = time.perf_counter()
        report["pycuda"] = ensure_pycuda(Path(args.dev_dir), Path(args.site), log)
        report["pycuda_install_s"] = round(time.perf_counter() - t0, 1)
        import pycuda
        import pycuda.driver as driver

        report["pycuda"] += f" (pycuda {pycuda.VERSION_TEXT})"
        print(f"pycuda: {report['pycuda']}", flush=True)
        from edge.gpu.cuda_context import CudaContext

        ctx = CudaContext(0).activate()
        p = ctx.properties
        report["device"] = {"name": p.name, "compute_capability": p.compute_capability_str,
                            "integrated": p.integrated, "can_map_host_memory": p.can_map_host_memory,
                            "unified_addressing": p.unified_addressing, "multiprocessors": p.multiprocessors,
                            "cuda_driver": driver.get_driver_version()}
    except Exception:  # no usable pycuda or GPU: still write the report
        report["errors"].append(traceback.format_exc())
        status = 2
    if status == 0:
        for name, step in (("cuda_preprocessor", lambda: check_cuda_preprocessor(driver, args.quick)),
                           ("pipeline", lambda: check_pipeline(driver, ctx, args.quick))):
            try:
                report["checks"] += step()
            except Exception as e:  # record and go on
                report["checks"].append({"name": name, "error": repr(e), "passed": False})
                report["errors"].append(traceback.format_exc())
        for c in report["checks"]:
            print(f"{c['name']}: {'ok' if c['passed'] else 'FAIL'} {c.get('max_error', c.get('error'))}", flush=True)
        try:
            report["overlap"] = time_overlap(driver, ctx, args.quick, args.spin_ms)
        except Exception:
            report["errors"].append(traceback.format_exc())
        ctx.release()
    report["bootstrap_log"] = "\n".join(log)
    return finish_check(report, status, out_dir, "gpu_pipeline_check", write_markdown)


if __name__ == "__main__":
    sys.exit(main())
