"""The preprocessing spec: every parameter of raw frame -> network input, in one place.

The spec travels inside the model file (ONNX ``metadata_props``), so the
runtime reproduces exactly the preprocessing the model was trained with.

Pipeline, per slice: stored value -> HU (slope, intercept; padding -> ``fill_hu``)
-> window (level/width, clipped) -> unit range [0, 1] -> resample to the model
grid (bilinear) -> normalize ``(x - mean) / std`` -> float32 / float16 NCHW.
With 2.5D input, ``slices`` adjacent slices are stacked as channels
(slice-major: channel = slice_index * n_windows + window_index).

Resampling convention (shared by all implementations): output pixel centre
(i, j) maps to source pixel coordinates ``(i * sy + oy, j * sx + ox)`` where
integer source coordinates are pixel centres. Samples within half a pixel of
the image edge use the edge value (clamp); samples further out are ``fill_hu``
windowed. With ``pixel_size_mm`` unset the whole image is resized
(``s = n_in / n_out``, ``o = s / 2 - 0.5``, OpenCV's INTER_LINEAR / PyTorch
``align_corners=False``); with it set the output grid has that physical pixel
size and is centred on the image centre.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

from edge.errors import ConfigError


@dataclass(frozen=True)
class Window:
    """A display window in HU: values map linearly from [level - width/2, level + width/2] to [0, 1]."""

    level: float
    width: float
    name: str = ""

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0


WINDOW_PRESETS = {
    "lung": Window(-600.0, 1500.0, "lung"),
    "mediastinum": Window(40.0, 400.0, "mediastinum"),
    "bone": Window(400.0, 3500.0, "bone"),
}


def window_preset(name: str) -> Window:
    """Look up a named window preset; raises ConfigError for unknown names."""
    try:
        return WINDOW_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown window preset {name!r} (known: {', '.join(sorted(WINDOW_PRESETS))})") from None


@dataclass(frozen=True)
class ResampleGeometry:
    """Per-axis affine from output pixel index to source pixel coordinate."""

    scale_y: float
    offset_y: float
    scale_x: float
    offset_x: float

    def to_source(self, row, col):
        return row * self.scale_y + self.offset_y, col * self.scale_x + self.offset_x

    def to_output(self, row, col):
        return (row - self.offset_y) / self.scale_y, (col - self.offset_x) / self.scale_x


@dataclass(frozen=True)
class PreprocessSpec:
    """All preprocessing parameters. Immutable; serialised with :meth:`to_json`."""

    windows: Tuple[Window, ...] = (WINDOW_PRESETS["lung"],)
    out_height: int = 256
    out_width: int = 256
    slices: int = 1  # 2.5D: odd number of adjacent slices stacked as channels
    pixel_size_mm: Optional[float] = None  # None: resize the whole image
    mean: float = 0.0
    std: float = 1.0
    fill_hu: float = -1024.0  # value of padding and of samples outside the image
    dtype: str = "float32"  # or "float16"
    version: int = field(default=1)

    def __post_init__(self):
        self.validate()

    @property
    def channels(self) -> int:
        return self.slices * len(self.windows)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if not self.windows:
            raise ConfigError("preprocess.windows: at least one window is required")
        for i, w in enumerate(self.windows):
            if not (w.width > 0):
                raise ConfigError(f"preprocess.windows[{i}].width must be > 0, got {w.width}")
        for key in ("out_height", "out_width"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1 or v > 4096:
                raise ConfigError(f"preprocess.{key} must be an integer in 1..4096, got {v!r}")
        if not isinstance(self.slices, int) or self.slices < 1 or self.slices % 2 == 0:
            raise ConfigError(f"preprocess.slices must be a positive odd integer, got {self.slices!r}")
        if self.pixel_size_mm is not None and not (self.pixel_size_mm > 0):
            raise ConfigError(f"preprocess.pixel_size_mm must be > 0 or unset, got {self.pixel_size_mm!r}")
        if not (self.std > 0):
            raise ConfigError(f"preprocess.std must be > 0, got {self.std!r}")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"preprocess.dtype must be 'float32' or 'float16', got {self.dtype!r}")

    def resample_geometry(self, rows: int, columns: int, pixel_spacing=(1.0, 1.0)) -> ResampleGeometry:
        """The output->source pixel mapping for a frame of this size and spacing."""
        if self.pixel_size_mm is None:
            sy = rows / self.out_height
            sx = columns / self.out_width
            return ResampleGeometry(sy, sy / 2.0 - 0.5, sx, sx / 2.0 - 0.5)
        sy = self.pixel_size_mm / float(pixel_spacing[0])
        sx = self.pixel_size_mm / float(pixel_spacing[1])
        # centre of output grid ((n_out - 1) / 2) lands on centre of source ((n_in - 1) / 2)
        oy = (rows - 1) / 2.0 - sy * (self.out_height - 1) / 2.0
        ox = (columns - 1) / 2.0 - sx * (self.out_width - 1) / 2.0
        return ResampleGeometry(sy, oy, sx, ox)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = [asdict(w) for w in self.windows]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"preprocess: unknown key(s) {', '.join(unknown)}")
        if "windows" in d:
            wins = []
            for i, w in enumerate(d["windows"]):
                if isinstance(w, str):
                    wins.append(window_preset(w))
                elif isinstance(w, dict):
                    try:
                        wins.append(Window(float(w["level"]), float(w["width"]), str(w.get("name", ""))))
                    except (KeyError, TypeError, ValueError) as e:
                        raise ConfigError(f"preprocess.windows[{i}]: needs numeric level and width ({e})") from None
                else:
                    raise ConfigError(f"preprocess.windows[{i}]: expected a preset name or {{level, width}}")
            d["windows"] = tuple(wins)
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"preprocess spec is not valid JSON: {e}") from None
        return cls.from_dict(d)
