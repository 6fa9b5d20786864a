"""The manifest written beside every TensorRT engine, and the check that refuses a mismatched one.

A serialized engine only runs where it was built: the same TensorRT version
(unless built version-compatible), the same GPU (unless built hardware-
compatible), and it bakes in the input layout of one preprocessing spec. The
engine builder (``tools/build_engine.py``) writes :class:`EngineManifest` as
JSON next to the engine (:func:`manifest_path`); the runtime reads it before
deserializing and raises :class:`EngineMismatchError` naming every difference.

The manifest also carries the ONNX file's ``metadata_props`` (preprocess and
decode specs, model card) because a TensorRT engine does not keep them.

Compatibility rules (TensorRT documentation, "Engine Compatibility"):

- default: the runtime version must equal the build version exactly;
- ``version_compatible`` (built with TensorRT >= 8.6): any later runtime of the
  same major version, and across majors only 8 -> 10 and 10 -> 11;
- hardware compatibility ``none``: same compute capability, and by default the
  same device model; ``same_compute_capability``: any device of that compute
  capability; ``ampere_plus``: any device of compute capability >= 8.0.
"""

import hashlib
import json
import os
import re
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from edge.errors import EdgeError, InputError
from edge.model_file import PREPROCESS_KEY
from edge.preprocess.spec import PreprocessSpec

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_COMPATIBILITY = ("none", "same_compute_capability", "ampere_plus")
# Cross-major pairs TensorRT supports for version-compatible engines (build major, runtime major).
CROSS_MAJOR_VERSION_COMPATIBLE = ((8, 10), (10, 11))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMPUTE_CAPABILITY = re.compile(r"^\d+\.\d+$")


class EngineMismatchError(EdgeError):
    """An engine that cannot or must not run here: the message lists every difference."""


@dataclass(frozen=True)
class EngineManifest:
    """What an engine was built from, for which device and input. Serialised with :meth:`to_dict`."""

    tensorrt_version: str  # trt.__version__ at build time, e.g. "10.3.0.30"
    device_name: str  # CUDA device name, e.g. "Orin"
    compute_capability: str  # "major.minor", e.g. "8.7"
    precision: str  # one of PRECISIONS
    input_name: str
    input_shape: Tuple[int, ...]  # -1 for the dynamic batch dimension
    input_dtype: str  # numpy name of the input binding type: "float32" or "float16"
    input_spec_sha256: str  # input_spec_sha256(preprocess spec) the engine was built for
    onnx_sha256: str
    engine_sha256: str
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    calibration_sha256: Optional[str] = None  # INT8 calibration data (cache or Q/DQ source)
    calibration_method: Optional[str] = None  # e.g. "entropy", "percentile", "mse", "max", "qdq"
    dla_core: Optional[int] = None  # None: GPU engine
    gpu_fallback: bool = False
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    flags: Tuple[str, ...] = ()  # builder flags, for the record and the rebuild decision
    build_time_utc: str = ""
    builder: str = ""  # tool and its version
    model_metadata: Dict[str, str] = field(default_factory=dict)  # the ONNX metadata_props
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "flags", tuple(str(f) for f in self.flags))
        object.__setattr__(self, "model_metadata", dict(self.model_metadata))

    def validate(self, source="<manifest>") -> None:
        """Raise InputError naming the first bad field."""

        def bad(key, reason):
            raise InputError(source, f"manifest field '{key}' {reason}")

        if self.format_version != FORMAT_VERSION:
            bad("format_version", f"is {self.format_version!r}; this runtime reads version {FORMAT_VERSION}")
        for key in ("tensorrt_version", "device_name", "input_name"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                bad(key, "must be a non-empty string")
        if parse_version(self.tensorrt_version) is None:
            bad("tensorrt_version", f"is not a version number: {self.tensorrt_version!r}")
        if not _COMPUTE_CAPABILITY.match(str(self.compute_capability)):
            bad("compute_capability", f"must look like '8.7', got {self.compute_capability!r}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.input_dtype not in ("float32", "float16"):
            bad("input_dtype", f"must be 'float32' or 'float16', got {self.input_dtype!r}")
        if len(self.input_shape) != 4 or any(d < 1 for d in self.input_shape[1:]) or not (
                self.input_shape[0] == -1 or self.input_shape[0] >= 1):
            bad("input_shape", f"must be [batch or -1, C, H, W] with positive C, H, W, got {list(self.input_shape)}")
        for key in ("input_spec_sha256", "onnx_sha256", "engine_sha256", "calibration_sha256"):
            value = getattr(self, key)
            if value is None and key == "calibration_sha256":
                continue
            if not isinstance(value, str) or not _SHA256.match(value):
                bad(key, "must be a lowercase hex sha256")
        for key in ("min_batch", "opt_batch", "max_batch"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            bad("opt_batch", f"needs min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch} <= {self.opt_batch} <= {self.max_batch}")
        if self.input_shape[0] != -1 and not self.min_batch == self.max_batch == self.input_shape[0]:
            bad("max_batch", f"a static input batch of {self.input_shape[0]} needs min_batch == max_batch == "
                             f"{self.input_shape[0]}")
        if self.precision == "int8" and self.calibration_sha256 is None and self.calibration_method != "qdq":
            bad("calibration_sha256", "is required for an int8 engine unless calibration_method is 'qdq'")
        if self.dla_core is not None and (not _is_int(self.dla_core) or self.dla_core < 0):
            bad("dla_core", f"must be a non-negative integer or null, got {self.dla_core!r}")
        if self.dla_core is not None and not self.min_batch == self.opt_batch == self.max_batch:
            bad("max_batch", "a DLA engine needs a fixed batch (DLA has no dynamic dimensions): "
                             f"min_batch == opt_batch == max_batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.dla_core is not None and self.precision == "fp32":
            bad("precision", "fp32 cannot run on DLA (DLA runs fp16 and int8 only)")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            bad("hardware_compatibility",
                f"must be one of {', '.join(HARDWARE_COMPATIBILITY)}, got {self.hardware_compatibility!r}")
        if self.version_compatible and _version_tuple(self.tensorrt_version)[:2] < (8, 6):
            bad("version_compatible", f"needs TensorRT >= 8.6 at build time, built with {self.tensorrt_version}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.model_metadata.items()):
            bad("model_metadata", "must map strings to strings")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["flags"] = list(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, source="<manifest>") -> "EngineManifest":
        if not isinstance(d, Mapping):
            raise InputError(source, "manifest must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(source, f"manifest has unknown field(s) {', '.join(unknown)} "
                                     f"(written by a newer builder? this runtime reads format {FORMAT_VERSION})")
        required = [f.name for f in fields(cls) if f.default is f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise InputError(source, f"manifest lacks field(s) {', '.join(missing)}")
        try:
            manifest = cls(**dict(d))
        except (TypeError, ValueError) as e:
            raise InputError(source, f"manifest field has the wrong type: {e}") from None
        manifest.validate(source)
        return manifest

    def build_inputs(self) -> dict:
        """The fields whose change requires a rebuild (everything but the outputs of a build)."""
        d = self.to_dict()
        for key in ("engine_sha256", "build_time_utc", "builder", "format_version"):
            d.pop(key)
        return d



@dataclass(frozen=True)
class RuntimeEnvironment:
    """What the runtime sees on this machine."""

    tensorrt_version: str
    device_name: str
    compute_capability: str
    dla_cores: int = 0


def manifest_path(engine_path) -> Path:
    """``model.engine`` -> ``model.engine.manifest.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + MANIFEST_SUFFIX)


def input_spec_sha256(spec: PreprocessSpec) -> str:
    """Hash of the canonical JSON of a preprocessing spec (what the engine's input means)."""
    return hashlib.sha256(spec.to_json().encode("utf-8")).hexdigest()


def file_sha256(path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_bytes), b""):
                digest.update(chunk)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    return digest.hexdigest()


def write_manifest(manifest: EngineManifest, path) -> Path:
    """Validate and write atomically (temporary file, fsync, rename)."""
    path = Path(path)
    manifest.validate(path)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_manifest(path) -> EngineManifest:
    """Read and validate a manifest; InputError names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "engine manifest not found: an engine needs the manifest its builder wrote "
                               "beside it (tools/build_engine.py)") from None
    except OSError as e:
        raise InputError(path, f"cannot read engine manifest: {e.strerror or e}") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise InputError(path, f"engine manifest is not JSON: {e}") from None
    return EngineManifest.from_dict(d, source=path)


def parse_version(text) -> Optional[Tuple[int, ...]]:
    """"10.3.0.30" -> (10, 3, 0, 30); None if it is not dotted integers."""
    if not isinstance(text, str) or not re.match(r"^\d+(\.\d+)*$", text.strip()):
        return None
    return tuple(int(p) for p in text.strip().split("."))


def _version_tuple(text) -> Tuple[int, ...]:
    return parse_version(text) or (0,)


def _padded(v: Tuple[int, ...], n: int = 4) -> Tuple[int, ...]:
    return tuple(v) + (0,) * (n - len(v))


def _cc_tuple(text: str) -> Tuple[int, int]:
    major, minor = str(text).split(".")
    return int(major), int(minor)


def tensorrt_version_difference(built: str, runtime: str, version_compatible: bool) -> Optional[str]:
    """Why an engine built with ``built`` cannot run on ``runtime``; None if it can."""
    b, r = _padded(_version_tuple(built)), _padded(_version_tuple(runtime))
    if not version_compatible:
        if b != r:
            return (f"TensorRT version differs: engine built with {built}, this device has {runtime} "
                    "(a plan runs only on the exact version that built it, unless built version-compatible)")
        return None
    if r < b:
        return (f"TensorRT version differs: version-compatible engine built with {built} needs TensorRT {built} "
                f"or later, this device has {runtime}")
    if r[0] != b[0] and (b[0], r[0]) not in CROSS_MAJOR_VERSION_COMPATIBLE:
        return (f"TensorRT version differs: a version-compatible engine from TensorRT {b[0]} cannot run on "
                f"TensorRT {r[0]} (supported across majors: "
                + ", ".join(f"{x} -> {y}" for x, y in CROSS_MAJOR_VERSION_COMPATIBLE) + ")")
    return None


def device_differences(manifest: EngineManifest, env: RuntimeEnvironment,
                       allow_other_device_model: bool = False) -> List[str]:
    """Why the device does not fit the engine (empty when it does)."""
    out = []
    built_cc, here_cc = _cc_tuple(manifest.compute_capability), _cc_tuple(env.compute_capability)
    level = manifest.hardware_compatibility
    if level == "ampere_plus":
        if here_cc < (8, 0):
            out.append(f"compute capability differs: engine is hardware-compatible with Ampere and newer "
                       f"(sm >= 8.0), this device is sm {env.compute_capability}")
    elif built_cc != here_cc:
        out.append(f"compute capability differs: engine built for sm {manifest.compute_capability} "
                   f"({manifest.device_name}), this device is sm {env.compute_capability} ({env.device_name})")
    elif level == "none" and manifest.device_name != env.device_name and not allow_other_device_model:
        out.append(f"GPU model differs: engine built on '{manifest.device_name}', this device is "
                   f"'{env.device_name}' (same sm {env.compute_capability}; rebuild here, or allow other "
                   "device models explicitly)")
    if manifest.dla_core is not None and manifest.dla_core >= env.dla_cores:
        out.append(f"DLA core {manifest.dla_core} requested by the engine, this device has "
                   f"{env.dla_cores} DLA core(s)")
    return out


def check_manifest(manifest: EngineManifest, env: RuntimeEnvironment, *,
                   expected_input_spec: Optional[PreprocessSpec] = None,
                   engine_sha256: Optional[str] = None,
                   allow_other_device_model: bool = False) -> List[str]:
    """Every reason the engine must not run here; an empty list means it fits."""
    problems = []
    if engine_sha256 is not None and engine_sha256 != manifest.engine_sha256:
        problems.append("engine file differs from the one the manifest describes (sha256 "
                        f"{engine_sha256[:12]}... vs manifest {manifest.engine_sha256[:12]}...)")
    version = tensorrt_version_difference(manifest.tensorrt_version, env.tensorrt_version,
                                          manifest.version_compatible)
    if version:
        problems.append(version)
    problems += device_differences(manifest, env, allow_other_device_model)
    if expected_input_spec is not None:
        want = input_spec_sha256(expected_input_spec)
        if want != manifest.input_spec_sha256:
            problems.append("input spec differs: the engine was built for preprocessing spec sha256 "
                            f"{manifest.input_spec_sha256[:12]}..., the runtime uses {want[:12]}...")
        if expected_input_spec.dtype != manifest.input_dtype:
            problems.append(f"input dtype differs: engine input is {manifest.input_dtype}, "
                            f"the spec produces {expected_input_spec.dtype}")
        want_chw = (expected_input_spec.channels, expected_input_spec.out_height, expected_input_spec.out_width)
        if tuple(manifest.input_shape[1:]) != want_chw:
            problems.append(f"input shape differs: engine input is {list(manifest.input_shape)}, "
                            f"the spec produces [N, {', '.join(str(d) for d in want_chw)}]")
    return problems


def validate_manifest(manifest: EngineManifest, env: RuntimeEnvironment, *, engine_path="<engine>",
                      **kwargs) -> None:
    """:func:`check_manifest`, raising EngineMismatchError that names the engine and every difference."""
    problems = check_manifest(manifest, env, **kwargs)
    if problems:
        raise EngineMismatchError(
            f"{engine_path}: refusing this engine: " + "; ".join(problems)
            + ". Rebuild it on this device with tools/build_engine.py.")


def embedded_input_spec(manifest: EngineManifest, source="<manifest>") -> Optional[PreprocessSpec]:
    """The preprocessing spec carried in ``model_metadata`` (None if absent); checked against its hash."""
    text = manifest.model_metadata.get(PREPROCESS_KEY)
    if text is None:
        return None
    spec = PreprocessSpec.from_json(text)
    if input_spec_sha256(spec) != manifest.input_spec_sha256:
        raise InputError(source, f"manifest model_metadata['{PREPROCESS_KEY}'] does not match its "
                                 "input_spec_sha256: the manifest was edited or written by a broken builder")
    return spec


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
