"""Making a bundle from a model on the workstation (the library behind ``tools/package_update.py``).

The payload is the model, not an engine: ``payload/model.onnx`` (FP32 or Q/DQ,
with its preprocess / decode specs in the ONNX metadata), optionally
``payload/calibration.cache`` and ``payload/recipe<.ext>`` for the device's
engine build, ``payload/golden.npz`` (given, or made here by running the model
with ONNX Runtime on a phantom series) and optionally
``payload/trust/rotation.json`` (a key rotation the device applies after the
update). Golden vectors are checked against the model before anything is
signed, so a bundle cannot ship vectors its own model fails.
"""

import re
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from edge.errors import ConfigError, InputError
from edge.model_file import ModelSpecs, read_model_specs
from edge.update.bundle import hash_file, write_bundle
from edge.update.errors import GoldenCheckError
from edge.update.golden import GoldenVectors, check_golden, make_golden, phantom_inputs
from edge.update.manifest import GoldenSpec, Manifest, Targets, TensorRTRange, format_timestamp
from edge.update.signing import PrivateKey

MODEL_PAYLOAD = "payload/model.onnx"
CALIBRATION_PAYLOAD = "payload/calibration.cache"
GOLDEN_PAYLOAD = "payload/golden.npz"
ROTATION_PAYLOAD = "payload/trust/rotation.json"


@dataclass
class PackageResult:
    manifest: Manifest
    golden: GoldenVectors
    notes: List[str] = field(default_factory=list)


def _model_name(specs: ModelSpecs, onnx_path: Path, given: Optional[str]) -> str:
    name = given or specs.card.get("name") or onnx_path.stem
    if not isinstance(name, str) or not re.match(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", name):
        raise ConfigError(f"model name {name!r} is not usable in a manifest: pass --model-name "
                          "with letters, digits, '.', '_', '-'")
    return name


def _file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    return path


def package_bundle(
    out,
    onnx,
    key: PrivateKey,
    version: str,
    release: int,
    hardware: Sequence[str] = ("cpu",),
    tensorrt: Optional[TensorRTRange] = None,
    min_runtime_version: Optional[str] = None,
    expires_days: float = 90.0,
    calibration_cache=None,
    recipe=None,
    golden=None,
    golden_inputs: int = 4,
    golden_seed: int = 0,
    tolerances: Optional[Dict[str, float]] = None,
    model_name: Optional[str] = None,
    rotation=None,
    now: Optional[datetime] = None,
    compress: bool = True,
    self_check: bool = True,
) -> PackageResult:
    """Write a signed bundle to ``out``; see the module docstring. ``tolerances``: GoldenSpec fields to override."""
    if min_runtime_version is None:
        from edge import __version__ as min_runtime_version
    if not expires_days > 0:
        raise ConfigError(f"--expires-days must be > 0, got {expires_days}")
    onnx = _file(onnx, "ONNX model")
    specs = read_model_specs(onnx)
    notes: List[str] = []
    sources: Dict[str, Path] = {MODEL_PAYLOAD: onnx}
    if calibration_cache is not None:
        sources[CALIBRATION_PAYLOAD] = _file(calibration_cache, "calibration cache")
    recipe_name = None
    if recipe is not None:
        recipe = _file(recipe, "engine recipe")
        recipe_name = "payload/recipe" + (recipe.suffix if re.match(r"\.[A-Za-z0-9]{1,8}\Z", recipe.suffix) else "")
        sources[recipe_name] = recipe
    if rotation is not None:
        sources[ROTATION_PAYLOAD] = _file(rotation, "key rotation statement")
    tol = replace(GoldenSpec(GOLDEN_PAYLOAD), **(tolerances or {}))
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner

    with tempfile.TemporaryDirectory(prefix="ct-edge-bundle-") as tmp:
        if golden is None:
            with OnnxRuntimeRunner(onnx) as runner:
                vectors = make_golden(runner, specs.decode, phantom_inputs(specs.preprocess, golden_inputs, golden_seed))
            golden_path = Path(tmp) / "golden.npz"
            vectors.save(golden_path)
        else:
            golden_path = _file(golden, "golden vectors")
            vectors = GoldenVectors.load(golden_path)
        if self_check:
            try:
                check_golden(lambda: OnnxRuntimeRunner(onnx), vectors, specs.decode, tol)
            except GoldenCheckError as e:
                raise GoldenCheckError(f"{golden_path}: the golden vectors do not match {onnx}: {e}") from None
        if not any(len(p) for p in vectors.peaks):
            notes.append("the golden vectors hold no finding: the device's golden check only compares the heatmap")
        sources[GOLDEN_PAYLOAD] = golden_path
        created = (now or datetime.now(timezone.utc)).replace(microsecond=0)
        manifest = Manifest(
            model=_model_name(specs, onnx, model_name),
            version=version,
            release=release,
            created=format_timestamp(created),
            expires=format_timestamp(created + timedelta(days=expires_days)),
            min_runtime_version=min_runtime_version,
            targets=Targets(tuple(hardware), tensorrt),
            key_id=key.key_id,
            model_file=MODEL_PAYLOAD,
            calibration_cache=CALIBRATION_PAYLOAD if calibration_cache is not None else None,
            recipe=recipe_name,
            golden=tol,
            files={name: hash_file(path) for name, path in sorted(sources.items())},
        )
        write_bundle(out, manifest, sources, key, compress=compress)
    return PackageResult(manifest, vectors, notes)
