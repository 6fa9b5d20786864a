"""Turning an extracted bundle into a model the runtime can open: the install step's ``prepare_model`` hook.

* TensorRT device: build the engine here, from the bundled ONNX, calibration
  cache and recipe (an engine is tied to the TensorRT version and GPU it was
  built on, so bundles never carry one), with ``engines.builder.build_engine``
  (the engine's manifest is written beside it), and run it with
  ``edge.backends.tensorrt_runner.TensorRtRunner``; both imported lazily.
  Precision: :func:`choose_precision`.
* Elsewhere: ONNX Runtime on the bundled model as it is.

Either way ``prepared.json`` is written into the version folder: the backend,
the artifact to load (relative path) and the model's preprocess / decode specs,
so the runtime can open the version later without re-reading the ONNX file
(:func:`open_prepared`).
"""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from edge.backends.base import Runner
from edge.errors import InputError, MissingDependencyError
from edge.model_file import ModelSpecs
from edge.update.device import ONNXRUNTIME, TENSORRT
from edge.update.durable import write_durably
from edge.update.errors import UpdateError
from edge.update.manifest import Manifest, canonical_json

PREPARED_FILE = "prepared.json"
ENGINE_FILE = "prepared/model.engine"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedModel:
    """A version folder whose model is ready to run; :meth:`open_runner` gives a new, inactive runner."""

    directory: Path
    backend: str
    artifact: str  # relative to ``directory``
    specs: ModelSpecs

    @property
    def artifact_path(self) -> Path:
        return self.directory.joinpath(*self.artifact.split("/"))

    def open_runner(self) -> Runner:
        if self.backend == ONNXRUNTIME:
            from edge.backends.onnxruntime_runner import OnnxRuntimeRunner

            return OnnxRuntimeRunner(self.artifact_path)
        try:
            from edge.backends.tensorrt_runner import TensorRtRunner
        except ImportError as e:
            raise MissingDependencyError(f"cannot run a TensorRT engine here: {e}") from None
        return TensorRtRunner(self.artifact_path, expected_input_spec=self.specs.preprocess)

    def write(self) -> None:
        data = canonical_json({"backend": self.backend, "artifact": self.artifact, "specs": self.specs.to_metadata()})
        write_durably(self.directory / PREPARED_FILE, data)


def open_prepared(version_dir) -> PreparedModel:
    """The prepared model of an installed version folder (or the ``current`` link)."""
    version_dir = Path(version_dir)
    path = version_dir / PREPARED_FILE
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"no usable prepared model: {e}") from None
    if not isinstance(obj, dict) or set(obj) != {"backend", "artifact", "specs"}:
        raise InputError(path, "must hold backend, artifact and specs")
    if obj["backend"] not in (ONNXRUNTIME, TENSORRT) or not isinstance(obj["artifact"], str):
        raise InputError(path, f"unknown backend {obj['backend']!r}")
    if not isinstance(obj["specs"], dict) or not all(isinstance(v, str) for v in obj["specs"].values()):
        raise InputError(path, "specs must be an object of JSON strings")
    specs = ModelSpecs.from_metadata(obj["specs"], source=path)
    prepared = PreparedModel(version_dir, obj["backend"], obj["artifact"], specs)
    if not prepared.artifact_path.is_file():
        raise InputError(prepared.artifact_path, "the prepared model file is missing")
    return prepared


def _read_specs(runner) -> ModelSpecs:
    with runner:
        return ModelSpecs.from_metadata(runner.custom_metadata(), source=runner.model_path)


def choose_precision(recipe, quantized: bool, has_calibration_cache: bool) -> str:
    """INT8 when the recipe allows it and the bundle carries what its INT8 mode needs (a Q/DQ model for
    ``explicit``, a calibration cache for ``implicit``); else FP16, else FP32, as the recipe allows."""
    if "int8" in recipe.precisions:
        if (recipe.int8_mode == "explicit" and quantized) or (recipe.int8_mode == "implicit" and has_calibration_cache):
            return "int8"
    for precision in ("fp16", "fp32"):
        if precision in recipe.precisions:
            return precision
    raise UpdateError(f"recipe {recipe.name} allows only {', '.join(recipe.precisions)}, "
                      "and the bundle lacks what that needs (a Q/DQ model or a calibration cache)")


def _build_engine(staged_dir: Path, manifest: Manifest) -> None:
    try:
        from engines.builder import QUANTIZATION_KEY, BuildRequest, build_engine, model_interface
        from engines.recipe import recipe_from_dict
    except ImportError as e:
        raise MissingDependencyError(f"this TensorRT device cannot build engines: {e}") from None

    def payload(rel):
        return None if rel is None else staged_dir.joinpath(*rel.split("/"))

    if manifest.recipe is None:
        raise UpdateError(f"bundle {manifest.version_name} has no engine recipe, which a TensorRT device needs "
                          "(package it with --recipe)")
    recipe_path = payload(manifest.recipe)
    try:
        recipe = recipe_from_dict(json.loads(recipe_path.read_text()), str(recipe_path))
    except ValueError as e:
        raise InputError(recipe_path, f"engine recipe is not JSON: {e}") from None
    recipe = dataclasses.replace(recipe, timing_cache=None)  # a repository path; nothing to reuse on the device
    onnx = payload(manifest.model_file)
    cache = payload(manifest.calibration_cache)
    quantization = model_interface(onnx).metadata.get(QUANTIZATION_KEY)
    precision = choose_precision(recipe, quantization is not None, cache is not None)
    info = {}
    if precision == "int8" and recipe.int8_mode == "explicit":
        try:
            info = json.loads(quantization)
        except ValueError:
            raise InputError(onnx, f"metadata {QUANTIZATION_KEY} is not JSON") from None
    engine = payload(ENGINE_FILE)
    engine.parent.mkdir(parents=True, exist_ok=True)
    request = BuildRequest(onnx, engine, recipe, precision,
                           calibration_cache=cache if precision == "int8" and recipe.int8_mode == "implicit" else None,
                           calibration_sha256=info.get("calibration_sha256"), calibration_method=info.get("method"))
    build_engine(request, force=True, log=log.info)
    if not engine.is_file():
        raise InputError(engine, "the engine builder wrote no engine")


def prepare_model(staged_dir, manifest: Manifest, backend: str) -> PreparedModel:
    """Default hook: build the TensorRT engine or use the ONNX model as is; write ``prepared.json``."""
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner

    staged_dir = Path(staged_dir)
    model = staged_dir.joinpath(*manifest.model_file.split("/"))
    specs = _read_specs(OnnxRuntimeRunner(model))
    if backend == TENSORRT:
        _build_engine(staged_dir, manifest)
        prepared = PreparedModel(staged_dir, TENSORRT, ENGINE_FILE, specs)
    elif backend == ONNXRUNTIME:
        prepared = PreparedModel(staged_dir, ONNXRUNTIME, manifest.model_file, specs)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    prepared.write()
    return prepared
