"""Launchers for the fused CUDA preprocessing kernel (``cuda/preprocess.cu``).

Two backends share one argument packing (:func:`pack_params`):
:class:`CudaPreprocessor` (pycuda, on the device, writes into any device
pointer such as the TensorRT input binding) and :class:`CupyPreprocessor`
(CuPy, for checks on a GPU workstation). pycuda and cupy are imported lazily.

Kernel signature: ``(const SRC* src, DST* dst, PreprocessParams params)``,
one thread per output pixel, grid z over frames. ``dst`` points at the first
plane to write; plane ``w`` of frame ``z`` starts ``w * dst_channel_stride +
z * dst_frame_stride`` elements later.
"""

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from edge.errors import ConfigError, InputError, MissingDependencyError
from edge.frame import CTFrame
from edge.preprocess.spec import PreprocessSpec

KERNEL_SOURCE_PATH = Path(__file__).with_name("cuda") / "preprocess.cu"
MAX_WINDOWS = 4
BLOCK = (32, 8, 1)

# Same order and C types as ``struct PreprocessParams``; align=True applies the
# C layout rules (the build test checks the offsets against the compiler's).
PARAMS_DTYPE = np.dtype(
    [
        ("scale_y", np.float64),
        ("offset_y", np.float64),
        ("scale_x", np.float64),
        ("offset_x", np.float64),
        ("src_rows", np.int32),
        ("src_cols", np.int32),
        ("src_row_stride", np.int32),
        ("src_frame_stride", np.int32),
        ("dst_rows", np.int32),
        ("dst_cols", np.int32),
        ("dst_row_stride", np.int32),
        ("dst_channel_stride", np.int32),
        ("dst_frame_stride", np.int32),
        ("n_windows", np.int32),
        ("has_padding", np.int32),
        ("padding_low", np.int32),
        ("padding_high", np.int32),
        ("rescale_slope", np.float32),
        ("rescale_intercept", np.float32),
        ("fill_hu", np.float32),
        ("mean", np.float32),
        ("inv_std", np.float32),
        ("window_low", np.float32, (MAX_WINDOWS,)),
        ("window_inv_width", np.float32, (MAX_WINDOWS,)),
    ],
    align=True,
)

_SRC_NAMES = {np.dtype(np.int16): "int16", np.dtype(np.uint16): "uint16"}
_DST_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_INT32_MAX = 2**31 - 1


def kernel_name(src_dtype, dst_dtype) -> str:
    """Entry point for stored dtype int16/uint16 and output dtype float32/float16."""
    src, dst = np.dtype(src_dtype), np.dtype(dst_dtype)
    if src not in _SRC_NAMES:
        raise ConfigError(f"CUDA preprocessing: stored pixels must be int16 or uint16, got {src}")
    if dst not in _DST_NAMES:
        raise ConfigError(f"CUDA preprocessing: output must be float32 or float16, got {dst}")
    return f"preprocess_{_SRC_NAMES[src]}_{_DST_NAMES[dst]}"


def launch_grid(out_height: int, out_width: int, n_frames: int = 1) -> Tuple[int, int, int]:
    """Grid for :data:`BLOCK`: one thread per output pixel, z over frames."""
    return (-(-out_width // BLOCK[0]), -(-out_height // BLOCK[1]), n_frames)


def pack_params(
    spec: PreprocessSpec,
    *,
    rows: int,
    columns: int,
    rescale_slope: float,
    rescale_intercept: float,
    padding: Optional[Tuple[int, int]] = None,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    src_row_stride: Optional[int] = None,
    src_frame_stride: Optional[int] = None,
    dst_row_stride: Optional[int] = None,
    dst_channel_stride: Optional[int] = None,
    dst_frame_stride: Optional[int] = None,
) -> np.ndarray:
    """The kernel's ``PreprocessParams`` as a 1-element structured array.

    Strides are in elements; defaults describe contiguous frames in and
    contiguous (n_windows, H, W) planes per frame out. Pass the array itself
    to CuPy and ``params[0]`` to pycuda: both copy its bytes by value.
    """
    n_windows = len(spec.windows)
    if n_windows > MAX_WINDOWS:
        raise ConfigError(
            f"preprocess.windows: the CUDA kernel supports at most {MAX_WINDOWS} windows, got {n_windows}")
    geom = spec.resample_geometry(rows, columns, pixel_spacing)
    plane = spec.out_height * spec.out_width
    p = np.zeros(1, dtype=PARAMS_DTYPE)
    p["scale_y"], p["offset_y"] = geom.scale_y, geom.offset_y
    p["scale_x"], p["offset_x"] = geom.scale_x, geom.offset_x
    ints = {
        "src_rows": rows,
        "src_cols": columns,
        "src_row_stride": columns if src_row_stride is None else src_row_stride,
        "src_frame_stride": rows * columns if src_frame_stride is None else src_frame_stride,
        "dst_rows": spec.out_height,
        "dst_cols": spec.out_width,
        "dst_row_stride": spec.out_width if dst_row_stride is None else dst_row_stride,
        "dst_channel_stride": plane if dst_channel_stride is None else dst_channel_stride,
        "dst_frame_stride": n_windows * plane if dst_frame_stride is None else dst_frame_stride,
        "n_windows": n_windows,
        "has_padding": int(padding is not None),
        "padding_low": 0 if padding is None else padding[0],
        "padding_high": 0 if padding is None else padding[1],
    }
    for key, value in ints.items():
        if not -_INT32_MAX - 1 <= int(value) <= _INT32_MAX:
            raise ConfigError(f"CUDA preprocessing: {key}={value} does not fit the kernel's int32")
        p[key] = int(value)
    p["rescale_slope"] = rescale_slope
    p["rescale_intercept"] = rescale_intercept
    p["fill_hu"] = spec.fill_hu
    p["mean"] = spec.mean
    p["inv_std"] = 1.0 / spec.std
    for i, window in enumerate(spec.windows):
        p["window_low"][0, i] = window.low
        p["window_inv_width"][0, i] = 1.0 / window.width
    return p


def frame_params(frame: CTFrame, spec: PreprocessSpec, **strides) -> np.ndarray:
    """:func:`pack_params` for one frame's size, rescale, padding and spacing."""
    pixels = _stored_pixels(frame)
    rows, columns = pixels.shape
    return pack_params(
        spec,
        rows=rows,
        columns=columns,
        rescale_slope=frame.rescale_slope,
        rescale_intercept=frame.rescale_intercept,
        padding=frame.padding,
        pixel_spacing=frame.geometry.pixel_spacing,
        **strides,
    )


def read_kernel_source() -> str:
    return KERNEL_SOURCE_PATH.read_text()


def _stored_pixels(frame: CTFrame) -> np.ndarray:
    pixels = np.asarray(frame.pixels)
    if pixels.ndim != 2:
        raise InputError(frame.source, f"expected a 2-D frame, got pixel array of shape {pixels.shape}")
    if pixels.dtype not in _SRC_NAMES:
        raise InputError(frame.source, f"stored pixels must be int16 or uint16 for preprocessing, got {pixels.dtype}")
    return pixels


def _same_layout(frames: Sequence[CTFrame]) -> None:
    """Frames of one launch share one PreprocessParams."""
    first = frames[0]
    key = (np.asarray(first.pixels).shape, np.asarray(first.pixels).dtype, first.rescale_slope,
           first.rescale_intercept, first.padding, tuple(first.geometry.pixel_spacing))
    for f in frames[1:]:
        other = (np.asarray(f.pixels).shape, np.asarray(f.pixels).dtype, f.rescale_slope,
                 f.rescale_intercept, f.padding, tuple(f.geometry.pixel_spacing))
        if other != key:
            raise InputError(f.source, "frames preprocessed in one batch must share size, dtype, rescale, "
                                       "padding and pixel spacing; preprocess it separately")


class CupyPreprocessor:
    """The kernel through CuPy (``cupy.RawModule``, NVRTC); outputs are CuPy arrays."""

    def __init__(self, spec: PreprocessSpec):
        try:
            import cupy
        except ImportError as e:
            raise MissingDependencyError(f"CUDA preprocessing with CuPy needs the 'cupy' package ({e})") from None
        self.spec = spec
        self._cupy = cupy
        self._module = cupy.RawModule(code=read_kernel_source())
        self._kernels = {}

    def kernel(self, src_dtype, dst_dtype):
        name = kernel_name(src_dtype, dst_dtype)
        if name not in self._kernels:
            self._kernels[name] = self._module.get_function(name)
        return self._kernels[name]

    def launch(self, src, dst, params: np.ndarray, n_frames: int = 1, stream=None) -> None:
        """Run the kernel: ``src`` a CuPy stored-pixel array, ``dst`` a CuPy array whose first
        element is the first plane to write, ``params`` from :func:`pack_params`."""
        kernel = self.kernel(src.dtype, dst.dtype)
        grid = launch_grid(int(params["dst_rows"][0]), int(params["dst_cols"][0]), n_frames)
        if stream is None:
            kernel(grid, BLOCK, (src, dst, params))
        else:
            with stream:
                kernel(grid, BLOCK, (src, dst, params))

    def preprocess_frames(self, frames: Sequence[CTFrame], out=None):
        """Frames sharing one layout -> CuPy array (n_frames, n_windows, H, W) in spec dtype (or ``out``'s)."""
        if not frames:
            raise ConfigError("CUDA preprocessing: no frames given")
        _same_layout(frames)
        cp = self._cupy
        pixels = np.stack([_stored_pixels(f) for f in frames])
        shape = (len(frames), len(self.spec.windows), self.spec.out_height, self.spec.out_width)
        if out is None:
            out = cp.empty(shape, dtype=self.spec.dtype)
        elif tuple(out.shape) != shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous array of shape {shape}, got {tuple(out.shape)}")
        params = frame_params(frames[0], self.spec)
        self.launch(cp.asarray(pixels), out, params, n_frames=len(frames))
        return out

    def preprocess_frame(self, frame: CTFrame, out=None):
        """One frame -> CuPy array (n_windows, H, W)."""
        batch_out = None if out is None else out.reshape((1,) + tuple(out.shape))
        return self.preprocess_frames([frame], batch_out)[0]


class CudaPreprocessor:
    """The kernel through pycuda, writing into a caller-owned device buffer.

    A CUDA context must be current (e.g. the one TensorRT runs in). The module
    is loaded from a prebuilt cubin/fatbin when ``binary_path`` is given,
    otherwise compiled from source with nvcc (JetPack ships it). One staging
    buffer holds the uploaded pixels: use one instance per CUDA stream.
    """

    def __init__(self, spec: PreprocessSpec, binary_path=None, nvcc_options: Sequence[str] = ()):
        try:
            import pycuda.driver as driver
        except ImportError as e:
            raise MissingDependencyError(f"CUDA preprocessing needs pycuda (pip install pycuda): {e}") from None
        self.spec = spec
        self._driver = driver
        if binary_path is not None:
            self._module = driver.module_from_file(str(binary_path))
        else:
            from pycuda.compiler import SourceModule

            # no_extern_c: the source uses templates; its entry points are extern "C" already.
            self._module = SourceModule(read_kernel_source(), no_extern_c=True, options=list(nvcc_options))
        self._kernels = {}
        self._staging = None
        self._staging_bytes = 0

    def _kernel(self, src_dtype, dst_dtype):
        name = kernel_name(src_dtype, dst_dtype)
        if name not in self._kernels:
            self._kernels[name] = self._module.get_function(name)
        return self._kernels[name]

    def _upload(self, pixels: np.ndarray, stream):
        if self._staging is None or self._staging_bytes < pixels.nbytes:
            self._staging = self._driver.mem_alloc(pixels.nbytes)
            self._staging_bytes = pixels.nbytes
        self._driver.memcpy_htod_async(self._staging, pixels, stream)
        return self._staging

    def preprocess_frame(self, frame: CTFrame, dst_ptr: int, *, channel_offset: int = 0,
                         dst_dtype: Optional[str] = None, stream=None) -> None:
        """Preprocess one frame into the contiguous NCHW buffer at device address ``dst_ptr``,
        writing its n_windows planes at channels ``channel_offset ...`` (element type
        ``dst_dtype``, default the spec's). Asynchronous on ``stream``."""
        pixels = np.ascontiguousarray(_stored_pixels(frame))
        dst_dtype = np.dtype(dst_dtype or self.spec.dtype)
        kernel = self._kernel(pixels.dtype, dst_dtype)
        params = frame_params(frame, self.spec)
        plane = self.spec.out_height * self.spec.out_width
        dst = np.uint64(int(dst_ptr) + channel_offset * plane * dst_dtype.itemsize)
        src = self._upload(pixels, stream)
        grid = launch_grid(self.spec.out_height, self.spec.out_width, 1)
        kernel(src, dst, params[0], block=BLOCK, grid=grid, stream=stream)
