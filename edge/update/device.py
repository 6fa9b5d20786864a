"""What this device is, and whether a bundle may be installed on it.

A device is described by the runtime version (``edge.__version__``), its
TensorRT version (None where TensorRT is not installed) and hardware tags.
Tags come from ``--hardware``, else ``device.json`` in the state folder
(``{"hardware": ["jetson-orin", "sm_87"]}``, written at provisioning), else a
best guess: ``cpu`` without TensorRT; with it ``jetson-orin`` / ``jetson-xavier``
from the device tree and ``sm_90``-style compute capability from ``nvidia-smi``.

Rules (:func:`check_compatibility`):

* runtime version >= the manifest's ``min_runtime_version``;
* a TensorRT device builds an engine, so the bundle must target one of its
  hardware tags and give a TensorRT range holding the device's version. It is
  never silently served by ONNX Runtime instead (that would be a 10x slower
  model nobody asked for);
* a device without TensorRT runs ONNX Runtime and needs ``cpu`` in the targets.
"""

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from edge.errors import ConfigError
from edge.update.errors import IncompatibleBundleError
from edge.update.manifest import Manifest, compare_versions, is_hardware_tag

DEVICE_FILE = "device.json"
CPU_TAG = "cpu"
TENSORRT = "tensorrt"
ONNXRUNTIME = "onnxruntime"


@dataclass(frozen=True)
class DeviceProfile:
    runtime_version: str
    hardware: Tuple[str, ...]
    tensorrt_version: Optional[str] = None

    @property
    def backend(self) -> str:
        return TENSORRT if self.tensorrt_version else ONNXRUNTIME

    def to_dict(self) -> dict:
        return {"runtime_version": self.runtime_version, "hardware": list(self.hardware),
                "tensorrt_version": self.tensorrt_version, "backend": self.backend}


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def _gpu_tags() -> Tuple[str, ...]:
    """``jetson-<family>`` from the device tree, ``sm_<major><minor>`` from nvidia-smi where it exists."""
    tags = []
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace").lower()
    except OSError:
        model = ""
    tags += [f"jetson-{family}" for family in ("orin", "xavier", "nano", "tx2") if family in model][:1]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    if out and re.fullmatch(r"\d+\.\d+", out[0]):
        tags.append("sm_" + out[0].replace(".", ""))
    return tuple(tags)


def _tags_from_file(path: Path) -> Optional[Tuple[str, ...]]:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON: {e}") from None
    hw = obj.get("hardware") if isinstance(obj, dict) else None
    if not isinstance(hw, list) or not all(is_hardware_tag(t) for t in hw):
        raise ConfigError(f"{path}: 'hardware' must be a list of tags like 'jetson-orin'")
    return tuple(hw)


def detect_device(state_dir=None, hardware: Optional[Sequence[str]] = None,
                  runtime_version: Optional[str] = None) -> DeviceProfile:
    """The running device's profile (see the module docstring for where each part comes from)."""
    if runtime_version is None:
        from edge import __version__ as runtime_version
    trt = tensorrt_version()
    if hardware:
        bad = [t for t in hardware if not is_hardware_tag(t)]
        if bad:
            raise ConfigError(f"--hardware {bad[0]!r}: tags are lowercase letters, digits, '.', '_', '-'")
        tags = tuple(hardware)
    else:
        tags = _tags_from_file(Path(state_dir) / DEVICE_FILE) if state_dir is not None else None
        if tags is None:
            tags = _gpu_tags() if trt else (CPU_TAG,)
    return DeviceProfile(runtime_version, tags, trt)


def check_compatibility(manifest: Manifest, device: DeviceProfile) -> str:
    """The backend the bundle's model will run on here; IncompatibleBundleError saying why not."""
    what = f"bundle {manifest.model} {manifest.version} (release {manifest.release})"
    if compare_versions(device.runtime_version, manifest.min_runtime_version) < 0:
        raise IncompatibleBundleError(f"{what} needs runtime >= {manifest.min_runtime_version}; "
                                      f"this device runs {device.runtime_version}: update the runtime first")
    targets = manifest.targets
    if device.tensorrt_version:
        try:
            compare_versions(device.tensorrt_version, "0")
        except ValueError:
            raise IncompatibleBundleError(
                f"cannot read this device's TensorRT version {device.tensorrt_version!r}") from None
        if not set(targets.hardware) & set(device.hardware):
            raise IncompatibleBundleError(
                f"{what} targets {', '.join(targets.hardware)}; this TensorRT device is "
                f"{', '.join(device.hardware) or 'untagged (set hardware in ' + DEVICE_FILE + ')'}")
        if targets.tensorrt is None:
            raise IncompatibleBundleError(f"{what} gives no TensorRT version range; this device builds TensorRT "
                                          f"{device.tensorrt_version} engines")
        if not targets.tensorrt.contains(device.tensorrt_version):
            raise IncompatibleBundleError(f"{what} needs TensorRT {targets.tensorrt.format()}; this device has "
                                          f"{device.tensorrt_version}")
        return TENSORRT
    if CPU_TAG not in targets.hardware:
        raise IncompatibleBundleError(f"{what} targets {', '.join(targets.hardware)} only; this device has no "
                                      f"TensorRT and runs ONNX Runtime, which needs '{CPU_TAG}' in the targets")
    return ONNXRUNTIME
