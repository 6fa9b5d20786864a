"""Fast CPU preprocessing with OpenCV, float32 throughout.

Per window, three whole-image passes and one resample: stored value -> window
and normalization folded into one affine map (``cv2.addWeighted`` to float32),
clip, padding fill (``cv2.inRange`` mask, computed once per frame), then
``cv2.resize(INTER_LINEAR)`` when the whole image is resized (its sampling is
the spec's: ``s = n_in / n_out``, half-pixel centres, edge clamp) or a
separable bilinear gather in physical pixel-size mode (``cv2.warpAffine``
with float32 sample positions is up to ~3e-5 off the reference at 512 px).
Normalizing before the resample is exact in real arithmetic: bilinear weights
sum to one and the outside fill is normalized the same way.
"""

from collections import deque
from typing import Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np

from edge.errors import ConfigError, InputError
from edge.frame import CTFrame
from edge.preprocess.spec import PreprocessSpec, ResampleGeometry, Window

_STORED_DTYPES = (np.dtype(np.int16), np.dtype(np.uint16))


class _SeparableSampler:
    """Bilinear sampling on an axis-aligned grid as a row pass then a column pass."""

    def __init__(self, rows: int, cols: int, geom: ResampleGeometry, out_h: int, out_w: int):
        self.y0, self.y1, self.wy, self.inside_y = _axis(rows, out_h, geom.scale_y, geom.offset_y)
        self.x0, self.x1, self.wx, self.inside_x = _axis(cols, out_w, geom.scale_x, geom.offset_x)
        self.wy = self.wy[:, None]
        self.outside_y = ~self.inside_y
        self.outside_x = ~self.inside_x

    def sample(self, img: np.ndarray, fill: float, out: np.ndarray) -> None:
        top = np.take(img, self.y0, axis=0)
        bottom = np.take(img, self.y1, axis=0)
        bottom -= top
        bottom *= self.wy
        top += bottom  # (out_h, cols)
        left = np.take(top, self.x0, axis=1)
        right = np.take(top, self.x1, axis=1)
        right -= left
        right *= self.wx
        np.add(left, right, out=out, casting="same_kind")
        out[self.outside_y, :] = fill
        out[:, self.outside_x] = fill


def _axis(n_in: int, n_out: int, scale: float, offset: float):
    coord = np.arange(n_out, dtype=np.float64) * scale + offset
    inside = (coord >= -0.5) & (coord <= n_in - 0.5)
    clamped = np.clip(coord, 0.0, n_in - 1.0)
    lower = np.floor(clamped).astype(np.intp)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (clamped - lower).astype(np.float32), inside


class CpuPreprocessor:
    """One frame -> its (n_windows, H, W) planes, as the spec says, on the CPU."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self._samplers = {}
        lo = -spec.mean / spec.std
        hi = (1.0 - spec.mean) / spec.std
        self._clip = (np.float32(lo), np.float32(hi))
        self._fill = [np.float32(self._normalized_unit(spec.fill_hu, w)) for w in spec.windows]
        self._fill_images = {}

    def _normalized_unit(self, hu: float, window: Window) -> float:
        unit = min(max((hu - window.low) / window.width, 0.0), 1.0)
        return (unit - self.spec.mean) / self.spec.std

    def _sampler(self, rows: int, cols: int, geom: ResampleGeometry) -> _SeparableSampler:
        key = (rows, cols, geom)
        if key not in self._samplers:
            if len(self._samplers) > 8:
                self._samplers.clear()
            self._samplers[key] = _SeparableSampler(rows, cols, geom, self.spec.out_height, self.spec.out_width)
        return self._samplers[key]

    def _fill_image(self, shape, window_index: int) -> np.ndarray:
        key = (shape, window_index)
        if key not in self._fill_images:
            if len(self._fill_images) > 8:
                self._fill_images.clear()
            self._fill_images[key] = np.full(shape, self._fill[window_index], dtype=np.float32)
        return self._fill_images[key]

    def _check_out(self, out: Optional[np.ndarray]) -> np.ndarray:
        shape = (len(self.spec.windows), self.spec.out_height, self.spec.out_width)
        if out is None:
            return np.empty(shape, dtype=np.float32)
        if out.shape != shape or out.dtype not in (np.float32, np.float16):
            raise ValueError(f"out must have shape {shape} and dtype float32/float16, got {out.shape} {out.dtype}")
        return out

    def preprocess_frame(self, frame: CTFrame, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Planes of one frame, (n_windows, H, W) float32, or written into ``out``
        (float32 or float16, e.g. a view into the network input) and returned."""
        spec = self.spec
        pixels = np.asarray(frame.pixels)
        if pixels.ndim != 2:
            raise InputError(frame.source, f"expected a 2-D frame, got pixel array of shape {pixels.shape}")
        if pixels.dtype not in _STORED_DTYPES:
            raise InputError(frame.source,
                             f"stored pixels must be int16 or uint16 for preprocessing, got {pixels.dtype}")
        pixels = np.ascontiguousarray(pixels)  # OpenCV needs contiguous rows
        out = self._check_out(out)
        rows, cols = pixels.shape
        geom = spec.resample_geometry(rows, cols, frame.geometry.pixel_spacing)
        padding = None
        if frame.padding is not None:
            padding = cv2.inRange(pixels, float(frame.padding[0]), float(frame.padding[1]))
        sampler = None if spec.pixel_size_mm is None else self._sampler(rows, cols, geom)
        lo, hi = self._clip
        unit = np.empty((rows, cols), dtype=np.float32)
        for w, window in enumerate(spec.windows):
            # ((stored * slope + intercept - low) / width - mean) / std == stored * a + b
            a = frame.rescale_slope / (window.width * spec.std)
            b = ((frame.rescale_intercept - window.low) / window.width - spec.mean) / spec.std
            cv2.addWeighted(pixels, a, pixels, 0.0, b, dst=unit, dtype=cv2.CV_32F)
            np.clip(unit, lo, hi, out=unit)
            if padding is not None:
                cv2.copyTo(self._fill_image(unit.shape, w), padding, dst=unit)
            self._resample(unit, sampler, self._fill[w], out[w])
        return out

    def _resample(self, unit: np.ndarray, sampler: Optional[_SeparableSampler], fill, plane: np.ndarray) -> None:
        direct = plane.dtype == np.float32 and plane.flags.c_contiguous
        target = plane if direct else np.empty(plane.shape, dtype=np.float32)
        if sampler is None:
            result = cv2.resize(unit, (self.spec.out_width, self.spec.out_height), dst=target,
                                interpolation=cv2.INTER_LINEAR)
            if not np.shares_memory(result, target):
                target[...] = result
        else:
            sampler.sample(unit, fill, target)
        if not direct:
            plane[...] = target


def assemble_input(planes: Sequence[np.ndarray], spec: PreprocessSpec, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Copy the planes of ``spec.slices`` adjacent slices into the network input (1, C, H, W).

    Slice-major channels: channel = slice_index * n_windows + window_index.
    ``out`` defaults to a new array in the spec dtype.
    """
    if len(planes) != spec.slices:
        raise ConfigError(f"preprocess.slices is {spec.slices} but {len(planes)} slice(s) were given")
    n_windows = len(spec.windows)
    shape = (1, spec.channels, spec.out_height, spec.out_width)
    if out is None:
        out = np.empty(shape, dtype=spec.dtype)
    elif out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    for s, plane in enumerate(planes):
        out[0, s * n_windows:(s + 1) * n_windows] = plane
    return out


def iter_network_inputs(frames: Iterable[CTFrame], preprocessor: CpuPreprocessor) -> Iterator[np.ndarray]:
    """Yield the (1, C, H, W) network input centred on each frame, in order.

    Each frame is preprocessed once and its planes reused by the ``slices``
    inputs that contain it. Neighbours beyond either end of the series repeat
    the end slice. The yielded array is overwritten by the next one: copy it
    to keep it.
    """
    spec = preprocessor.spec
    half = spec.slices // 2
    out = np.empty((1, spec.channels, spec.out_height, spec.out_width), dtype=spec.dtype)
    source = iter(frames)
    window = deque()  # planes of consecutive slices, first is slice `first`
    first = 0
    n_read = 0
    exhausted = False
    center = 0
    while True:
        while not exhausted and n_read <= center + half:
            try:
                frame = next(source)
            except StopIteration:
                exhausted = True
                break
            window.append(preprocessor.preprocess_frame(frame))
            n_read += 1
        if center >= n_read:
            return
        neighbours = [window[min(max(center + k, 0), n_read - 1) - first] for k in range(-half, half + 1)]
        yield assemble_input(neighbours, spec, out)
        if center - half >= first:
            window.popleft()
            first += 1
        center += 1
