"""Build a TensorRT engine from an ONNX model and a recipe, with TensorRT's Python API (imported lazily).

Written against the API common to TensorRT 8.5, 10.x and 11.x: explicit-batch
networks (the creation flag only before 10), ``OnnxParser.parse``,
``set_memory_pool_limit(WORKSPACE)``, one optimization profile over the batch
dimension, ``build_serialized_network``, timing caches (``create_timing_cache`` /
``set_timing_cache`` / ``get_timing_cache().serialize()``). Version-dependent
settings are applied only where the recipe asks for them and the recipe's
validation already ties each to the TensorRT version that has it.

INT8: ``explicit`` parses the Q/DQ ONNX (:mod:`calib.qdq`), with the INT8 flag
(and FP16 for the rest) on weakly typed networks, no flag on strongly typed
ones; ``implicit`` parses the FP32 ONNX with an ``IInt8EntropyCalibrator2`` whose
``read_calibration_cache`` returns our cache (:mod:`calib.trt_cache`), so
TensorRT never asks for a batch.

The engine is written with its :class:`edge.engine_manifest.EngineManifest`
beside it (``<engine>.manifest.json``); when an engine and manifest already
exist with the same build inputs (ONNX and calibration hashes, TensorRT
version, GPU, precision, flags, profile, input spec ...) and the engine's
hash matches, nothing is rebuilt.
"""

import ctypes
import ctypes.util
import datetime
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from edge.engine_manifest import (
    EngineManifest,
    file_sha256,
    input_spec_sha256,
    manifest_path,
    parse_version,
    read_manifest,
    write_manifest,
)
from edge.errors import ConfigError, EdgeError, InputError, MissingDependencyError
from edge.model_file import QUANTIZATION_KEY
from engines.recipe import Recipe

BUILDER_NAME = "ct-edge tools/build_engine.py"
_CU_ATTRIBUTE_CC_MAJOR = 75
_CU_ATTRIBUTE_CC_MINOR = 76


class TensorRtNotInstalled(MissingDependencyError):
    """TensorRT's Python bindings cannot be imported on this machine."""


class EngineBuildError(EdgeError):
    """TensorRT could not parse the model or build the engine: the message carries TensorRT's errors."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRtNotInstalled(
            f"TensorRT is not installed here ({e}): the engine must be built on the target with TensorRT "
            "(Jetson: python3-libnvinfer from JetPack; workstation: pip install tensorrt)") from None
    return tensorrt


def gpu_identity(device: int = 0) -> Tuple[str, str]:
    """(name, "major.minor" compute capability) of a CUDA device, from the driver API (works on Jetson too)."""
    library = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(library)
    except OSError as e:
        raise MissingDependencyError(f"no CUDA driver (libcuda) on this machine: {e}") from None

    def check(status, what):
        if status != 0:
            raise MissingDependencyError(f"CUDA driver call {what} failed with error {status}")

    check(cuda.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    check(cuda.cuDeviceGetName(name, 256, handle), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTRIBUTE_CC_MAJOR, handle), "cuDeviceGetAttribute")
    check(cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTRIBUTE_CC_MINOR, handle), "cuDeviceGetAttribute")
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


@dataclass(frozen=True)
class BuildRequest:
    onnx_path: Path  # what TensorRT parses: the Q/DQ ONNX for explicit INT8, else the FP32 ONNX
    engine_path: Path
    recipe: Recipe
    precision: str
    calibration_cache: Optional[Path] = None  # implicit INT8
    calibration_sha256: Optional[str] = None  # of the calibration inputs
    calibration_method: Optional[str] = None


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    manifest: EngineManifest
    rebuilt: bool
    reason: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelInterface:
    input_name: str
    input_shape: Tuple[int, ...]  # -1 for the dynamic batch
    input_dtype: str
    metadata: dict


def model_interface(onnx_path) -> ModelInterface:
    """Input and metadata of an ONNX file, through ONNX Runtime (the device has no onnx package)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several unrelated exception types for bad models
        raise InputError(onnx_path, f"not a loadable ONNX model: {e}") from None
    inp = sess.get_inputs()[0]
    shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
    dtype = "float16" if inp.type == "tensor(float16)" else "float32"
    return ModelInterface(inp.name, shape, dtype, dict(sess.get_modelmeta().custom_metadata_map))


def precision_flags(recipe: Recipe, precision: str) -> List[str]:
    """The BuilderFlag names a build sets (device flags included)."""
    if precision not in recipe.precisions:
        raise ConfigError(f"--{precision}: target {recipe.name} builds {', '.join(recipe.precisions)} only")
    flags = []
    if not recipe.strongly_typed:
        if precision == "int8":
            flags.append("INT8")
            if recipe.fp16_fallback:
                flags.append("FP16")
        elif precision == "fp16":
            flags.append("FP16")
    if recipe.device == "dla" and recipe.gpu_fallback:
        flags.append("GPU_FALLBACK")
    if recipe.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    return flags


def manifest_flags(recipe: Recipe, precision: str) -> List[str]:
    """Builder flags plus every other recipe setting that changes the engine (for the rebuild decision)."""
    out = precision_flags(recipe, precision)
    if recipe.strongly_typed:
        out.append("STRONGLY_TYPED")
    out.append(f"target={recipe.name}")
    out.append(f"workspace_mib={recipe.workspace_mib}")
    if precision == "int8":
        out.append(f"int8_mode={recipe.int8_mode}")
    if recipe.builder_optimization_level is not None:
        out.append(f"builder_optimization_level={recipe.builder_optimization_level}")
    return out


def planned_manifest(request: BuildRequest, tensorrt_version: str, device: Tuple[str, str]) -> EngineManifest:
    """The manifest the build will write, engine hash and build time left blank."""
    from edge.model_file import PREPROCESS_KEY
    from edge.preprocess.spec import PreprocessSpec

    recipe = request.recipe
    iface = model_interface(request.onnx_path)
    if PREPROCESS_KEY not in iface.metadata:
        raise InputError(request.onnx_path, "model lacks its preprocessing spec metadata: export it with "
                                            "tools/export_onnx.py")
    spec = PreprocessSpec.from_json(iface.metadata[PREPROCESS_KEY])
    if request.precision == "int8" and recipe.int8_mode == "implicit" and request.calibration_cache is None:
        raise ConfigError(f"target {recipe.name} builds INT8 implicitly and needs a calibration cache")
    cal_sha = request.calibration_sha256
    if request.precision == "int8" and cal_sha is None and request.calibration_cache is not None:
        cal_sha = file_sha256(request.calibration_cache)
    return EngineManifest(
        tensorrt_version=tensorrt_version, device_name=device[0], compute_capability=device[1],
        precision=request.precision, input_name=iface.input_name, input_shape=iface.input_shape,
        input_dtype=iface.input_dtype, input_spec_sha256=input_spec_sha256(spec),
        onnx_sha256=file_sha256(request.onnx_path), engine_sha256="0" * 64,
        min_batch=recipe.batch.min, opt_batch=recipe.batch.opt, max_batch=recipe.batch.max,
        calibration_sha256=cal_sha if request.precision == "int8" else None,
        calibration_method=(request.calibration_method or "qdq") if request.precision == "int8" else None,
        dla_core=recipe.dla_core if recipe.device == "dla" else None,
        gpu_fallback=recipe.device == "dla" and recipe.gpu_fallback,
        version_compatible=recipe.version_compatible, hardware_compatibility=recipe.hardware_compatibility,
        flags=tuple(manifest_flags(recipe, request.precision)), builder=BUILDER_NAME,
        model_metadata=iface.metadata,
    )


def up_to_date(engine_path: Path, planned: EngineManifest) -> Optional[str]:
    """None when the engine at ``engine_path`` was built from exactly these inputs, else why it must be built."""
    mpath = manifest_path(engine_path)
    if not engine_path.is_file() or not mpath.is_file():
        return "no engine yet"
    try:
        existing = read_manifest(mpath)
    except InputError as e:
        return f"unreadable manifest ({e.reason})"
    if file_sha256(engine_path) != existing.engine_sha256:
        return "engine file does not match its manifest"
    old, new = existing.build_inputs(), planned.build_inputs()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"changed: {', '.join(changed)}" if changed else None


def _check_version(trt, recipe: Recipe) -> str:
    version = trt.__version__
    have = parse_version(version) or (0,)
    if have[0] != recipe.tensorrt_version[0]:
        raise ConfigError(f"target {recipe.name} is for TensorRT {recipe.tensorrt}, this machine has {version}: "
                          "build on the target (or pick the target matching this TensorRT)")
    return version


def _make_logger(trt, messages: List[str]):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                messages.append(str(msg))
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}", flush=True)

    return _Logger()


def _cache_calibrator(trt, cache: bytes, batch_size: int):
    """IInt8EntropyCalibrator2 that only reads our cache: TensorRT uses its scales and asks for no data."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            return None  # called only when TensorRT rejects the cache: the build then fails with its reason

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return CacheCalibrator()


def _set_flag(trt, config, name: str) -> None:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise ConfigError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}: the recipe does not fit it")
    config.set_flag(flag)


def _build_serialized(trt, request: BuildRequest, planned: EngineManifest, timing_cache: Optional[Path]) -> bytes:
    recipe = request.recipe
    major = (parse_version(trt.__version__) or (0,))[0]
    errors: List[str] = []
    logger = _make_logger(trt, errors)
    builder = trt.Builder(logger)
    network_flags = 0
    if major < 10:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if recipe.strongly_typed and strongly_typed is not None:
        network_flags |= 1 << int(strongly_typed)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if recipe.version_compatible and hasattr(trt, "OnnxParserFlag"):
        native = getattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM", None)
        if native is not None:
            parser.set_flag(native)  # version-compatible plans cannot use the InstanceNorm plugin
    if not parser.parse(Path(request.onnx_path).read_bytes(), str(request.onnx_path)):
        details = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"{request.onnx_path}: TensorRT's ONNX parser failed: {details}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.workspace_mib << 20)
    for name in precision_flags(recipe, request.precision):
        _set_flag(trt, config, name)
    if recipe.builder_optimization_level is not None:
        config.builder_optimization_level = recipe.builder_optimization_level
    if recipe.hardware_compatibility != "none":
        level = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      level[recipe.hardware_compatibility])
    if recipe.device == "dla":
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = recipe.dla_core

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        rest = dims[1:]
        if any(d < 0 for d in rest):
            raise EngineBuildError(f"{request.onnx_path}: input {tensor.name!r} has dynamic dimensions besides "
                                   f"the batch: {dims}")
        b = recipe.batch
        profile.set_shape(tensor.name, (b.min,) + rest, (b.opt,) + rest, (b.max,) + rest)
    config.add_optimization_profile(profile)

    if request.precision == "int8" and recipe.int8_mode == "implicit" and not recipe.strongly_typed:
        cache = Path(request.calibration_cache).read_bytes()
        config.int8_calibrator = _cache_calibrator(trt, cache, recipe.batch.opt)
        if hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(profile)

    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{request.onnx_path}: TensorRT could not build the engine: "
                               + ("; ".join(errors[-5:]) or "see the TensorRT log above"))
    if timing_cache is not None:
        _write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()).tobytes())
    return memoryview(serialized).tobytes()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_engine(request: BuildRequest, force: bool = False, repo_root: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> BuildResult:
    """Build (or keep) the engine of ``request``; raises TensorRtNotInstalled where TensorRT is missing."""
    trt = import_tensorrt()
    version = _check_version(trt, request.recipe)
    device = gpu_identity()
    planned = planned_manifest(request, version, device)
    reason = "forced" if force else up_to_date(request.engine_path, planned)
    if reason is None:
        existing = read_manifest(manifest_path(request.engine_path))
        return BuildResult(request.engine_path, existing, False, "up to date: every build input unchanged")
    timing_cache = None
    if request.recipe.timing_cache:
        timing_cache = Path(request.recipe.timing_cache)
        if not timing_cache.is_absolute() and repo_root is not None:
            timing_cache = Path(repo_root) / timing_cache
    log(f"building {request.engine_path.name} ({reason}) with TensorRT {version} on {device[0]} (sm {device[1]})")
    t0 = time.perf_counter()
    data = _build_serialized(trt, request, planned, timing_cache)
    seconds = time.perf_counter() - t0
    _write_atomically(request.engine_path, data)
    built = dict(planned.to_dict(), engine_sha256=hashlib.sha256(data).hexdigest(),
                 build_time_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    manifest = EngineManifest.from_dict(built, source=manifest_path(request.engine_path))
    write_manifest(manifest, manifest_path(request.engine_path))
    return BuildResult(request.engine_path, manifest, True, reason, seconds)
