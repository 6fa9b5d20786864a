"""TensorRT's INT8 calibration cache, written from our activation ranges.

For implicit INT8 (TensorRT <= 10, and DLA, which needs it): an
``IInt8EntropyCalibrator2`` whose ``read_calibration_cache`` returns this file
makes the builder skip calibration and use these scales. The format is the one
TensorRT writes (sampleINT8's ``CalibrationTable`` files, e.g.
``TRT-7000-EntropyCalibration2`` then ``data: 3c008912``):

- first line ``TRT-<version>-<algorithm>``, ``<version>`` being
  ``NV_TENSORRT_VERSION`` (8.5.3 -> ``8503``; from TensorRT 10 on
  major * 10000 + minor * 100 + patch, 10.3.0 -> ``100300``) and ``<algorithm>``
  the calibrator's (``EntropyCalibration2`` here);
- then one ``<tensor name>: <scale>`` line per tensor, the scale (``amax / 127``)
  as the 8 hex digits of its IEEE-754 float32 bits, most significant first
  (``struct.pack(">f", scale).hex()``).

Tensor names are the ONNX tensor names (TensorRT's ONNX parser keeps them).
TensorRT ignores a cache written for another calibration algorithm.
"""

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping

from edge.errors import ConfigError, InputError

ENTROPY_CALIBRATION_2 = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class CalibrationCache:
    version: int  # NV_TENSORRT_VERSION, e.g. 8503 or 100300
    algorithm: str
    scales: Dict[str, float]


def trt_version_number(version: str) -> int:
    """``NV_TENSORRT_VERSION`` of a version string: ``"8.5.3"`` -> 8503, ``"10.3.0"`` -> 100300."""
    m = _VERSION.match(str(version).strip())
    if not m:
        raise ConfigError(f"TensorRT version must look like MAJOR.MINOR[.PATCH], got {version!r}")
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if major < 10:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    """The 8 hex digits TensorRT writes for a float32 scale."""
    return struct.pack(">f", float(scale)).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text.strip().rjust(8, "0")))[0]


def format_calibration_cache(scales: Mapping[str, float], trt_version: str,
                             algorithm: str = ENTROPY_CALIBRATION_2) -> str:
    """The cache text; ``scales`` maps tensor names to positive finite scales (kept in the given order)."""
    lines = [f"TRT-{trt_version_number(trt_version)}-{algorithm}"]
    for name, scale in scales.items():
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"calibration scale of tensor {name!r} must be positive and finite, got {scale!r}")
        if "\n" in name or ": " in name:
            raise ConfigError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(path, scales: Mapping[str, float], trt_version: str,
                            algorithm: str = ENTROPY_CALIBRATION_2) -> Path:
    path = Path(path)
    path.write_text(format_calibration_cache(scales, trt_version, algorithm))
    return path


def parse_calibration_cache(text: str, source="<cache>") -> CalibrationCache:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InputError(source, "empty calibration cache")
    m = _HEADER.match(lines[0].strip())
    if not m:
        raise InputError(source, f"first line must be TRT-<version>-<algorithm>, got {lines[0][:80]!r}")
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{1,8}", value.strip()):
            raise InputError(source, f"line {number}: expected '<tensor>: <8 hex digits>', got {line[:80]!r}")
        scales[name] = hex_to_scale(value)
    return CalibrationCache(int(m.group(1)), m.group(2), scales)


def read_calibration_cache(path) -> CalibrationCache:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read calibration cache: {e}") from None
    return parse_calibration_cache(text, path)
