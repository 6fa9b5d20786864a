"""The CUDA kernel: builds for the Jetson targets, its struct layout matches the
Python packing, and its arithmetic (run on the host) matches the reference."""

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edge.errors import ConfigError, InputError, MissingDependencyError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess import cuda_kernel
from edge.preprocess.cuda_kernel import KERNEL_SOURCE_PATH, PARAMS_DTYPE, frame_params, kernel_name, pack_params
from edge.preprocess.reference import preprocess_frame_reference
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec, Window

REPO = Path(__file__).resolve().parents[3]
ENTRY_POINTS = [kernel_name(s, d) for s in (np.int16, np.uint16) for d in (np.float32, np.float16)]
# Xavier (sm_72), Orin (sm_87), Hopper workstation (sm_90).
TARGET_ARCHS = ("72", "87", "90")
JETSON_ARCHS = ("72", "87")
THREE_WINDOWS = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"], WINDOW_PRESETS["bone"])
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror"]


@pytest.fixture(scope="module")
def nvcc():
    path = shutil.which("nvcc")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH but CI is set: the CUDA kernel build is required in CI")
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to build the kernel; CI requires it)")
    return path


@pytest.fixture(scope="module")
def supported_archs(nvcc):
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    return [a for a in TARGET_ARCHS if f"compute_{a}" in listed.split()]


def make_frame(shape, dtype=np.int16, padding=None, slope=1.0, intercept=0.0, spacing=(0.7, 0.7), seed=0):
    rng = np.random.default_rng(seed)
    stored = np.round((rng.integers(-1100, 2400, shape) - intercept) / slope)
    if padding is not None:
        stored[: shape[0] // 4, : shape[1] // 4] = padding[0]
    rows, cols = shape
    return CTFrame(stored.astype(dtype), slope, intercept, SliceGeometry(rows, cols, spacing, (0.0, 0.0, 0.0)),
                   padding=padding)


# --- argument packing, no compiler needed ---------------------------------------------------------

_C_TYPES = {"double": np.dtype(np.float64), "float": np.dtype(np.float32), "int": np.dtype(np.int32)}


def parse_struct(source: str):
    """(name, C type, count) of each PreprocessParams member, from the .cu source."""
    body = re.search(r"struct PreprocessParams \{(.*?)\};", source, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    defines = dict(re.findall(r"#define (\w+) (\d+)", source))
    members = []
    for ctype, name, count in re.findall(r"(double|float|int)\s+(\w+)(?:\[(\w+)\])?\s*;", body):
        members.append((name, ctype, int(defines.get(count, count)) if count else 1))
    return members


def c_layout(members):
    """Offsets and size by the C rules (natural alignment, trailing padding)."""
    offset, align, offsets = 0, 1, {}
    for name, ctype, count in members:
        a = _C_TYPES[ctype].itemsize
        offset = -(-offset // a) * a
        offsets[name] = offset
        offset += a * count
        align = max(align, a)
    return offsets, -(-offset // align) * align


def test_python_struct_matches_cuda_source():
    members = parse_struct(KERNEL_SOURCE_PATH.read_text())
    assert [m[0] for m in members] == list(PARAMS_DTYPE.names)
    for name, ctype, count in members:
        dtype = PARAMS_DTYPE.fields[name][0]
        assert dtype.base == _C_TYPES[ctype], name
        assert (dtype.shape or (1,)) == (count,), name
    offsets, size = c_layout(members)
    assert {n: PARAMS_DTYPE.fields[n][1] for n in PARAMS_DTYPE.names} == offsets
    assert PARAMS_DTYPE.itemsize == size


def test_pack_params_values():
    spec = PreprocessSpec(windows=THREE_WINDOWS, out_height=64, out_width=48, mean=0.5, std=0.25,
                          pixel_size_mm=1.5)
    p = pack_params(spec, rows=100, columns=80, rescale_slope=2.0, rescale_intercept=-1024.0, padding=(-5, 7),
                    pixel_spacing=(0.5, 0.75))[0]
    geom = spec.resample_geometry(100, 80, (0.5, 0.75))
    assert (p["scale_y"], p["offset_y"], p["scale_x"], p["offset_x"]) == (
        geom.scale_y, geom.offset_y, geom.scale_x, geom.offset_x)
    assert (p["src_rows"], p["src_cols"], p["src_row_stride"], p["src_frame_stride"]) == (100, 80, 80, 8000)
    assert (p["dst_rows"], p["dst_cols"], p["dst_row_stride"]) == (64, 48, 48)
    assert (p["dst_channel_stride"], p["dst_frame_stride"], p["n_windows"]) == (64 * 48, 3 * 64 * 48, 3)
    assert (p["has_padding"], p["padding_low"], p["padding_high"]) == (1, -5, 7)
    assert p["inv_std"] == np.float32(4.0) and p["mean"] == np.float32(0.5)
    np.testing.assert_array_equal(p["window_low"][:3], np.float32([w.low for w in THREE_WINDOWS]))
    np.testing.assert_array_equal(p["window_inv_width"][:3], np.float32([1 / w.width for w in THREE_WINDOWS]))
    no_pad = pack_params(spec, rows=10, columns=10, rescale_slope=1.0, rescale_intercept=0.0)[0]
    assert no_pad["has_padding"] == 0


def test_pack_params_rejects_more_windows_than_the_kernel_has():
    spec = PreprocessSpec(windows=THREE_WINDOWS + (Window(0.0, 100.0), Window(50.0, 10.0)))
    with pytest.raises(ConfigError, match="at most 4 windows"):
        pack_params(spec, rows=8, columns=8, rescale_slope=1.0, rescale_intercept=0.0)


def test_kernel_name_and_bad_dtypes():
    assert kernel_name(np.uint16, np.float16) == "preprocess_uint16_float16"
    with pytest.raises(ConfigError, match="int16 or uint16"):
        kernel_name(np.int32, np.float32)
    frame = make_frame((8, 8))
    frame.pixels = frame.pixels.astype(np.float32)
    frame.source = "IM7.dcm"
    with pytest.raises(InputError, match="IM7.dcm"):
        frame_params(frame, PreprocessSpec())


def test_entry_points_exist_in_source():
    source = KERNEL_SOURCE_PATH.read_text()
    for name in ENTRY_POINTS:
        assert re.search(rf'extern "C" __global__ void {name}\(', source), name


@pytest.mark.parametrize("module", ["pycuda", "cupy"])
def test_missing_gpu_package_is_a_user_error(monkeypatch, module):
    for name in ("pycuda", "pycuda.driver", "pycuda.compiler", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail even where installed
    cls = cuda_kernel.CudaPreprocessor if module == "pycuda" else cuda_kernel.CupyPreprocessor
    with pytest.raises(MissingDependencyError, match=module):
        cls(PreprocessSpec())


def test_pycuda_launcher_packs_arguments_for_a_binding_pointer(monkeypatch):
    """With a stand-in pycuda: the launch gets the staged pixels, the binding pointer advanced to the
    channel offset, the packed struct by value, and a grid covering the output."""
    calls = {}

    class FakeFunction:
        def __call__(self, *args, **kwargs):
            calls["args"], calls["kwargs"] = args, kwargs

    class FakeModule:
        def get_function(self, name):
            calls["name"] = name
            return FakeFunction()

    driver = types.ModuleType("pycuda.driver")
    driver.mem_alloc = lambda nbytes: ("alloc", nbytes)
    driver.memcpy_htod_async = lambda dst, src, stream=None: calls.setdefault("uploaded", (dst, src.copy()))
    compiler = types.ModuleType("pycuda.compiler")

    def source_module(source, no_extern_c, options):
        calls["compiled"] = no_extern_c
        return FakeModule()

    compiler.SourceModule = source_module
    package = types.ModuleType("pycuda")
    package.driver, package.compiler = driver, compiler
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.compiler", compiler)

    spec = PreprocessSpec(windows=THREE_WINDOWS, slices=3, out_height=40, out_width=70, dtype="float16")
    frame = make_frame((64, 48), dtype=np.uint16, intercept=-1024.0, padding=(0, 0))
    cuda_kernel.CudaPreprocessor(spec).preprocess_frame(frame, dst_ptr=1 << 20, channel_offset=6, stream="s")
    assert calls["compiled"] is True and calls["name"] == "preprocess_uint16_float16"
    src, dst, params = calls["args"]
    assert src == ("alloc", frame.pixels.nbytes) and calls["uploaded"][0] == src
    np.testing.assert_array_equal(calls["uploaded"][1], frame.pixels)
    assert dst == (1 << 20) + 6 * 40 * 70 * 2
    assert isinstance(params, np.void) and params.tobytes() == frame_params(frame, spec).tobytes()
    assert calls["kwargs"] == {"block": cuda_kernel.BLOCK, "grid": (3, 5, 1), "stream": "s"}


# --- nvcc builds -------------------------------------------------------------------------------

def test_compiles_for_jetson_and_workstation_archs(nvcc, supported_archs, tmp_path):
    assert any(a in supported_archs for a in JETSON_ARCHS), (
        f"this nvcc supports none of the Jetson archs {JETSON_ARCHS}")
    gencode = []
    for arch in supported_archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    fatbin = tmp_path / "preprocess.fatbin"
    result = subprocess.run([nvcc, "--fatbin", "-O3", *WARNINGS_AS_ERRORS, *gencode, "-o", str(fatbin),
                             str(KERNEL_SOURCE_PATH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = fatbin.read_bytes()
    for name in ENTRY_POINTS:
        assert name.encode() in data, name


HOST_PROGRAM = r"""
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <vector>
#include "preprocess.cu"

static std::vector<char> read_all(const char* path)
{
    std::vector<char> data;
    FILE* f = std::fopen(path, "rb");
    if (!f) return data;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
    std::fclose(f);
    return data;
}

static int write_all(const char* path, const void* data, size_t n)
{
    FILE* f = std::fopen(path, "wb");
    if (!f) return 1;
    const size_t written = std::fwrite(data, 1, n, f);
    std::fclose(f);
    return written == n ? 0 : 1;
}

template <typename SrcT, typename DstT>
static int run(const PreprocessParams& p, const char* src_path, int n_frames, const char* out_path)
{
    const std::vector<char> raw = read_all(src_path);
    const SrcT* src = reinterpret_cast<const SrcT*>(raw.data());
    std::vector<DstT> dst((size_t)n_frames * (size_t)p.dst_frame_stride);
    for (int f = 0; f < n_frames; ++f)
        for (int r = 0; r < p.dst_rows; ++r)
            for (int c = 0; c < p.dst_cols; ++c)
                preprocess_pixel(src, dst.data(), p, r, c, f);
    return write_all(out_path, dst.data(), dst.size() * sizeof(DstT));
}

int main(int argc, char** argv)
{
    if (argc == 2 && !std::strcmp(argv[1], "layout")) {
        std::printf("sizeof %zu\n", sizeof(PreprocessParams));
        LAYOUT_LINES
        return 0;
    }
    if (argc == 4 && !std::strcmp(argv[1], "half")) {
        const std::vector<char> raw = read_all(argv[2]);
        const size_t n = raw.size() / sizeof(float);
        std::vector<unsigned short> bits(n);
        for (size_t i = 0; i < n; ++i) {
            float v;
            std::memcpy(&v, raw.data() + i * sizeof(float), sizeof v);
            bits[i] = float_to_half_bits(v);
        }
        return write_all(argv[3], bits.data(), n * sizeof(unsigned short));
    }
    if (argc == 8 && !std::strcmp(argv[1], "run")) {
        const std::vector<char> raw = read_all(argv[4]);
        PreprocessParams p;
        if (raw.size() != sizeof p) return 2;
        std::memcpy(&p, raw.data(), sizeof p);
        const int n_frames = std::atoi(argv[6]);
        const bool u16 = !std::strcmp(argv[2], "uint16"), f16 = !std::strcmp(argv[3], "float16");
        if (u16 && f16) return run<unsigned short, unsigned short>(p, argv[5], n_frames, argv[7]);
        if (u16) return run<unsigned short, float>(p, argv[5], n_frames, argv[7]);
        if (f16) return run<short, unsigned short>(p, argv[5], n_frames, argv[7]);
        return run<short, float>(p, argv[5], n_frames, argv[7]);
    }
    return 3;
}
"""


@pytest.fixture(scope="module")
def host_program(nvcc, supported_archs, tmp_path_factory):
    """The kernel source compiled into a host program that runs preprocess_pixel over every pixel."""
    work = tmp_path_factory.mktemp("host_kernel")
    layout = "\n".join(f'std::printf("{n} %zu\\n", offsetof(PreprocessParams, {n}));' for n in PARAMS_DTYPE.names)
    (work / "host.cu").write_text(HOST_PROGRAM.replace("LAYOUT_LINES", layout))
    exe = work / "host"
    arch = supported_archs[-1] if supported_archs else "87"
    result = subprocess.run([nvcc, f"-arch=sm_{arch}", "-O2", "-std=c++14", *WARNINGS_AS_ERRORS,
                             "-Xcompiler", "-Wall,-Wextra,-Werror", "-I", str(KERNEL_SOURCE_PATH.parent),
                             "-o", str(exe), str(work / "host.cu")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return exe


def test_struct_layout_matches_the_compiler(host_program):
    lines = subprocess.run([str(host_program), "layout"], capture_output=True, text=True, check=True).stdout
    reported = dict(line.split() for line in lines.strip().splitlines())
    assert int(reported.pop("sizeof")) == PARAMS_DTYPE.itemsize
    assert {k: int(v) for k, v in reported.items()} == {n: PARAMS_DTYPE.fields[n][1] for n in PARAMS_DTYPE.names}


def run_host_kernel(exe, tmp_path, frames, spec, dst_dtype):
    pixels = np.stack([np.ascontiguousarray(f.pixels) for f in frames])
    params = frame_params(frames[0], spec)
    (tmp_path / "params.bin").write_bytes(params.tobytes())
    (tmp_path / "src.bin").write_bytes(pixels.tobytes())
    out_path = tmp_path / "out.bin"
    subprocess.run([str(exe), "run", pixels.dtype.name, np.dtype(dst_dtype).name, str(tmp_path / "params.bin"),
                    str(tmp_path / "src.bin"), str(len(frames)), str(out_path)], check=True)
    shape = (len(frames), len(spec.windows), spec.out_height, spec.out_width)
    return np.frombuffer(out_path.read_bytes(), dtype=dst_dtype).reshape(shape)


HOST_CASES = {
    "downsize_int16_padding": ((256, 256), dict(out_height=128, out_width=128),
                               dict(dtype=np.int16, padding=(-2000, -1900))),
    "upsize_non_square_uint16": ((40, 30), dict(out_height=97, out_width=61),
                                 dict(dtype=np.uint16, slope=0.5, intercept=-1024.0, padding=(0, 0))),
    "physical_three_windows_normalized": ((120, 100), dict(pixel_size_mm=1.7, out_height=80, out_width=64,
                                                          windows=THREE_WINDOWS, mean=0.3, std=0.25),
                                          dict(dtype=np.int16)),
}


@pytest.mark.parametrize("case", sorted(HOST_CASES))
def test_host_run_kernel_matches_reference_float32(host_program, tmp_path, case):
    shape, spec_kwargs, frame_kwargs = HOST_CASES[case]
    spec = PreprocessSpec(**spec_kwargs)
    frames = [make_frame(shape, seed=s, **frame_kwargs) for s in range(2)]
    out = run_host_kernel(host_program, tmp_path, frames, spec, np.float32)
    for f, frame in enumerate(frames):
        np.testing.assert_allclose(out[f], preprocess_frame_reference(frame, spec), rtol=0, atol=1e-5)


def test_host_run_kernel_float16_output(host_program, tmp_path):
    shape, spec_kwargs, frame_kwargs = HOST_CASES["physical_three_windows_normalized"]
    spec = PreprocessSpec(dtype="float16", **spec_kwargs)
    frame = make_frame(shape, **frame_kwargs)
    out = run_host_kernel(host_program, tmp_path, [frame], spec, np.float16)[0]
    ref = preprocess_frame_reference(frame, spec)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2**-11, atol=1e-4)


def test_host_half_conversion_rounds_like_numpy(host_program, tmp_path):
    rng = np.random.default_rng(5)
    special = np.float32([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0**-14, 2.0**-24, 2.0**-25,
                          1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, np.inf, -np.inf])
    # random bit patterns over the whole float range plus values near the half range
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    near = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-8, 5, 20000)).astype(np.float32)
    values = np.concatenate([special, bits[np.isfinite(bits)], near])
    (tmp_path / "f.bin").write_bytes(values.tobytes())
    subprocess.run([str(host_program), "half", str(tmp_path / "f.bin"), str(tmp_path / "h.bin")], check=True)
    ours = np.frombuffer((tmp_path / "h.bin").read_bytes(), dtype=np.uint16)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(ours, expected)


# --- on a GPU ------------------------------------------------------------------------------------

def test_kernel_on_gpu_with_cupy():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: the kernel is only run on a GPU machine "
                                              "(bench/gpu_preprocess_check.py)")
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        pytest.skip(f"cupy is installed but no CUDA device is usable: {e}")
    if n_devices == 0:
        pytest.skip("cupy is installed but there is no CUDA device")
    for spec_kwargs, frame_kwargs in [(dict(), dict(dtype=np.int16, padding=(-2000, -1900))),
                                      (dict(windows=THREE_WINDOWS, pixel_size_mm=2.0, mean=0.3, std=0.25,
                                            dtype="float16"), dict(dtype=np.uint16, intercept=-1024.0))]:
        spec = PreprocessSpec(**spec_kwargs)
        frame = make_frame((512, 512), **frame_kwargs)
        out = cupy.asnumpy(cuda_kernel.CupyPreprocessor(spec).preprocess_frame(frame)).astype(np.float64)
        ref = preprocess_frame_reference(frame, spec)
        if spec.dtype == "float16":
            np.testing.assert_allclose(out, ref, rtol=2**-11, atol=1e-4)
        else:
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_gpu_check_script_dry_run_without_pydicom_or_torch(tmp_path):
    """bench/gpu_preprocess_check.py runs where only numpy/opencv/cupy exist (no pydicom, no torch)."""
    script = REPO / "bench" / "gpu_preprocess_check.py"
    blocker = ("import sys, runpy\n"
               "for m in ('pydicom', 'torch', 'scipy', 'monai', 'pycuda'):\n"
               "    sys.modules[m] = None\n"
               f"sys.argv = [{str(script)!r}, '--dry-run', '--out', {str(tmp_path)!r}, '--quick']\n"
               f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    report = json.loads((tmp_path / "gpu_preprocess_check.json").read_text())
    assert report["dry_run"] is True and report["passed"] is True
    assert report["checks"] and all(c["passed"] for c in report["checks"])
    assert (tmp_path / "gpu_preprocess_check.md").read_text().startswith("# ")
