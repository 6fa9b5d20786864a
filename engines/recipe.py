"""Build recipes: how to build an engine for one target (a device and its TensorRT version).

A recipe is a JSON object in ``engines/recipes/<name>.json``:

========================== ============================================================================
key                        meaning
========================== ============================================================================
name                       the ``--target`` name (must equal the file's stem)
description                free text
tensorrt                   TensorRT version on the target, "MAJOR.MINOR[.PATCH]" (the cache header and
                           the flags available depend on it; the builder refuses another major)
precisions                 allowed of "int8", "fp16", "fp32"
int8_mode                  "explicit" (Q/DQ ONNX) or "implicit" (FP32 ONNX + calibration cache;
                           TensorRT <= 10 only, and what DLA needs)
strongly_typed             network created STRONGLY_TYPED (TensorRT >= 10; always on in 11): layer types
                           follow the ONNX, no precision flags
fp16_fallback              weakly typed builds also allow FP16 for layers left in floating point
device                     "gpu" or "dla"
dla_core                   DLA core (device "dla"), else null
gpu_fallback               layers DLA cannot run go to the GPU (device "dla")
workspace_mib              builder workspace memory pool limit
builder_optimization_level 0..5 or null for TensorRT's default (TensorRT >= 8.6)
timing_cache               path of the timing cache file (relative to the repository), or null
batch                      {"min", "opt", "max"} of the optimization profile's batch dimension
version_compatible         build a version-compatible plan (TensorRT >= 8.6)
hardware_compatibility     "none", "same_compute_capability" or "ampere_plus" (TensorRT >= 8.6; GPU only)
========================== ============================================================================

Rules checked here, with where they come from: TensorRT 11 removed the
precision builder flags and implicit quantization ("Migrating from TensorRT 10.x
to 11.x": BuilderFlag.FP16/INT8, IBuilderConfig.int8_calibrator removed), so a
TensorRT 11 recipe is strongly typed, explicit INT8 and FP32 only (FP16 there
needs a mixed-precision ONNX from ModelOpt AutoCast); builder optimization
levels, version-compatible and hardware-compatible plans arrived in 8.6; DLA
runs FP16 and INT8 only and needs build-time shapes (min == opt == max).
"""

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from edge.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
PRECISIONS = ("int8", "fp16", "fp32")
INT8_MODES = ("explicit", "implicit")
DEVICES = ("gpu", "dla")
HARDWARE_COMPATIBILITY = ("none", "same_compute_capability", "ampere_plus")
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Recipe:
    name: str
    tensorrt: str
    precisions: Tuple[str, ...]
    int8_mode: str
    batch: BatchProfile
    description: str = ""
    strongly_typed: bool = False
    fp16_fallback: bool = True
    device: str = "gpu"
    dla_core: Optional[int] = None
    gpu_fallback: bool = False
    workspace_mib: int = 1024
    builder_optimization_level: Optional[int] = None
    timing_cache: Optional[str] = None
    version_compatible: bool = False
    hardware_compatibility: str = "none"

    @property
    def tensorrt_version(self) -> Tuple[int, int, int]:
        m = _VERSION.match(self.tensorrt)
        return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["precisions"] = list(self.precisions)
        return d

    def with_overrides(self, **changes) -> "Recipe":
        """A copy with command-line overrides applied (None values are ignored), validated again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "dla_core" in changes and self.device != "dla":
            dla = ", ".join(n for n in list_recipes() if load_recipe(n).device == "dla") or "none"
            raise ConfigError(f"--dla-core: target {self.name} builds for the GPU; choose a DLA target "
                              f"({dla}) and --dla-core picks its core")
        return validate(dataclasses.replace(self, **changes), f"recipe {self.name} with command-line options")


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
_REQUIRED = ("name", "tensorrt", "precisions", "int8_mode", "batch")


def _err(source: str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {reason}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(r: Recipe, source: str) -> Recipe:
    """Raise ConfigError naming the recipe and the first bad key; return ``r``."""
    m = _VERSION.match(str(r.tensorrt))
    if not m:
        raise _err(source, "tensorrt", f"must look like 10.3 or 8.5.2, got {r.tensorrt!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) < (8, 5):
        raise _err(source, "tensorrt", f"TensorRT {r.tensorrt} is older than the oldest supported, 8.5")
    if not r.precisions or any(p not in PRECISIONS for p in r.precisions):
        raise _err(source, "precisions",
                   f"must be a non-empty list of {', '.join(PRECISIONS)}, got {list(r.precisions)}")
    if r.int8_mode not in INT8_MODES:
        raise _err(source, "int8_mode", f"must be one of {', '.join(INT8_MODES)}, got {r.int8_mode!r}")
    if r.device not in DEVICES:
        raise _err(source, "device", f"must be one of {', '.join(DEVICES)}, got {r.device!r}")
    for key in ("strongly_typed", "fp16_fallback", "gpu_fallback", "version_compatible"):
        if not isinstance(getattr(r, key), bool):
            raise _err(source, key, f"must be true or false, got {getattr(r, key)!r}")
    if not _is_int(r.workspace_mib) or r.workspace_mib < 1:
        raise _err(source, "workspace_mib", f"must be a positive integer, got {r.workspace_mib!r}")
    b = r.batch
    if not all(_is_int(v) and v >= 1 for v in (b.min, b.opt, b.max)) or not b.min <= b.opt <= b.max:
        raise _err(source, "batch", f"needs integers 1 <= min <= opt <= max, got {dataclasses.asdict(b)}")
    if r.builder_optimization_level is not None:
        if not _is_int(r.builder_optimization_level) or not 0 <= r.builder_optimization_level <= 5:
            raise _err(source, "builder_optimization_level",
                       f"must be 0..5 or null, got {r.builder_optimization_level!r}")
        if (major, minor) < (8, 6):
            raise _err(source, "builder_optimization_level", f"needs TensorRT >= 8.6, the target has {r.tensorrt}")
    if r.hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise _err(source, "hardware_compatibility",
                   f"must be one of {', '.join(HARDWARE_COMPATIBILITY)}, got {r.hardware_compatibility!r}")
    if r.version_compatible and (major, minor) < (8, 6):
        raise _err(source, "version_compatible", f"needs TensorRT >= 8.6, the target has {r.tensorrt}")
    if r.hardware_compatibility != "none" and ((major, minor) < (8, 6) or r.device == "dla"):
        raise _err(source, "hardware_compatibility", "needs TensorRT >= 8.6 and a GPU engine")
    if r.strongly_typed:
        if major < 10:
            raise _err(source, "strongly_typed", f"needs TensorRT >= 10, the target has {r.tensorrt}")
        if r.int8_mode != "explicit":
            raise _err(source, "int8_mode", "must be 'explicit' for a strongly typed network (no calibrator)")
        if "fp16" in r.precisions:
            raise _err(source, "precisions", "a strongly typed network takes its types from the ONNX: FP16 needs a "
                                             "mixed-precision ONNX (ModelOpt AutoCast), not a flag")
    if r.strongly_typed and r.fp16_fallback:
        raise _err(source, "fp16_fallback", "needs a weakly typed network (strongly_typed false)")
    if major >= 11 and not r.strongly_typed:
        raise _err(source, "strongly_typed",
                   "must be true for TensorRT 11 (weak typing and implicit INT8 were removed)")
    if r.device == "dla":
        if not _is_int(r.dla_core) or r.dla_core < 0:
            raise _err(source, "dla_core", f"a DLA recipe needs a non-negative integer core, got {r.dla_core!r}")
        if major >= 11:
            raise _err(source, "device", "this recipe targets TensorRT 11, which has no DLA support on Jetson")
        if "fp32" in r.precisions:
            raise _err(source, "precisions", "DLA runs fp16 and int8 only")
        if "int8" in r.precisions and r.int8_mode != "implicit":
            raise _err(source, "int8_mode", "DLA INT8 needs 'implicit' (calibration cache) in this project")
        if not b.min == b.opt == b.max:
            raise _err(source, "batch", f"DLA needs build-time shapes: min == opt == max, got {dataclasses.asdict(b)}")
    elif r.dla_core is not None:
        raise _err(source, "dla_core", "is set but device is 'gpu'")
    return r


def recipe_from_dict(d: dict, source: str) -> Recipe:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a recipe must be a JSON object")
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    d = dict(d)
    batch = d["batch"]
    if not isinstance(batch, dict) or sorted(batch) != ["max", "min", "opt"]:
        raise _err(source, "batch", f"must be an object with exactly min, opt and max, got {batch!r}")
    d["batch"] = BatchProfile(batch["min"], batch["opt"], batch["max"])
    if not isinstance(d["precisions"], list):
        raise _err(source, "precisions", f"must be a list, got {d['precisions']!r}")
    d["precisions"] = tuple(d["precisions"])
    for key in ("name", "tensorrt", "description", "int8_mode", "device", "hardware_compatibility"):
        if key in d and not isinstance(d[key], str):
            raise _err(source, key, f"must be a string, got {d[key]!r}")
    if d.get("timing_cache") is not None and not isinstance(d["timing_cache"], str):
        raise _err(source, "timing_cache", f"must be a path string or null, got {d['timing_cache']!r}")
    return validate(Recipe(**d), source)


def load_recipe(name_or_path, recipe_dir=RECIPE_DIR) -> Recipe:
    """A recipe by target name (``engines/recipes/<name>.json``) or by file path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = Path(recipe_dir) / f"{name_or_path}.json"
        if not path.is_file():
            known = ", ".join(list_recipes(recipe_dir)) or "none"
            raise ConfigError(f"unknown target {name_or_path!r} (known: {known})")
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: recipe is not JSON: {e}") from None
    recipe = recipe_from_dict(d, str(path))
    if recipe.name != path.stem:
        raise _err(str(path), "name", f"is {recipe.name!r} but the file is {path.name}: they must match")
    return recipe


def list_recipes(recipe_dir=RECIPE_DIR) -> List[str]:
    return sorted(p.stem for p in Path(recipe_dir).glob("*.json"))


def load_all(recipe_dir=RECIPE_DIR) -> Dict[str, Recipe]:
    return {name: load_recipe(name, recipe_dir) for name in list_recipes(recipe_dir)}
