"""The install step's model preparation: ONNX Runtime here, the TensorRT build through engines.builder (faked:
no TensorRT on the CI machines; the real build is exercised by the engine tests on a GPU)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import engines.builder
from edge.errors import InputError
from edge.update.device import ONNXRUNTIME, TENSORRT
from edge.update.errors import UpdateError
from edge.update.manifest import FileEntry, GoldenSpec, Manifest, Targets
from edge.update.prepare import ENGINE_FILE, PREPARED_FILE, choose_precision, open_prepared, prepare_model
from engines.recipe import load_recipe
from update_helpers import tiny_specs

ROOT = Path(__file__).resolve().parents[3]


def staged(tmp_path, onnx, recipe=None, cache=None) -> (Path, Manifest):
    folder = tmp_path / "staged"
    (folder / "payload").mkdir(parents=True)
    shutil.copy(onnx, folder / "payload" / "model.onnx")
    files = {"payload/model.onnx": FileEntry("0" * 64, 1), "payload/golden.npz": FileEntry("0" * 64, 1)}
    if recipe is not None:
        (folder / "payload" / "recipe.json").write_text(json.dumps(recipe))
        files["payload/recipe.json"] = FileEntry("0" * 64, 1)
    if cache is not None:
        (folder / "payload" / "calibration.cache").write_bytes(cache)
        files["payload/calibration.cache"] = FileEntry("0" * 64, 1)
    m = Manifest(model="tiny", version="1.0.0", release=1, created="2030-01-01T00:00:00Z",
                 expires="2030-02-01T00:00:00Z", min_runtime_version="0.1.0", targets=Targets(("cpu",)),
                 key_id="0" * 16, model_file="payload/model.onnx", golden=GoldenSpec("payload/golden.npz"),
                 files=files, recipe="payload/recipe.json" if recipe is not None else None,
                 calibration_cache="payload/calibration.cache" if cache is not None else None)
    return folder, m


def recipe_dict(name: str, **changes) -> dict:
    return dict(json.loads((ROOT / "engines" / "recipes" / f"{name}.json").read_text()), **changes)


def test_onnxruntime_preparation_round_trips(tmp_path, models):
    folder, m = staged(tmp_path, models["a"][0])
    prepared = prepare_model(folder, m, ONNXRUNTIME)
    assert (prepared.backend, prepared.artifact, prepared.specs) == (ONNXRUNTIME, "payload/model.onnx", tiny_specs())
    assert open_prepared(folder) == prepared
    with prepared.open_runner() as runner:
        assert list(runner.input_metadata()) == ["input"]
    (folder / PREPARED_FILE).write_text('{"backend": "cuda", "artifact": "x", "specs": {}}')
    with pytest.raises(InputError, match="unknown backend 'cuda'"):
        open_prepared(folder)
    with pytest.raises(InputError, match="no usable prepared model"):
        open_prepared(tmp_path)


def test_precision_follows_the_recipe_and_what_the_bundle_carries():
    explicit, implicit = load_recipe("orin-jp6"), load_recipe("xavier-jp5-dla")
    assert choose_precision(explicit, quantized=True, has_calibration_cache=False) == "int8"
    assert choose_precision(explicit, quantized=False, has_calibration_cache=True) == "fp16"
    assert implicit.int8_mode == "implicit"
    assert choose_precision(implicit, quantized=False, has_calibration_cache=True) == "int8"
    fp32_only = dataclasses.replace(explicit, precisions=("fp32",))
    assert choose_precision(fp32_only, quantized=True, has_calibration_cache=True) == "fp32"
    with pytest.raises(UpdateError, match="allows only int8"):
        choose_precision(dataclasses.replace(explicit, precisions=("int8",)), quantized=False,
                         has_calibration_cache=False)


def test_tensorrt_preparation_builds_an_engine_into_the_version_folder(tmp_path, models, monkeypatch):
    requests = []

    def fake_build(request, force=False, repo_root=None, log=print):
        requests.append((request, force))
        request.engine_path.write_bytes(b"engine")

    monkeypatch.setattr(engines.builder, "build_engine", fake_build)
    folder, m = staged(tmp_path, models["a"][0], recipe=recipe_dict("orin-jp6"), cache=b"cache")
    prepared = prepare_model(folder, m, TENSORRT)
    (request, force), = requests
    assert force and request.precision == "fp16"  # FP32 model, explicit-INT8 recipe: no INT8 without Q/DQ
    assert request.onnx_path == folder / "payload" / "model.onnx"
    assert request.engine_path == folder / ENGINE_FILE and request.calibration_cache is None
    assert request.recipe.name == "orin-jp6" and request.recipe.timing_cache is None
    assert (prepared.backend, prepared.artifact, prepared.specs) == (TENSORRT, ENGINE_FILE, tiny_specs())
    assert open_prepared(folder).artifact_path.read_bytes() == b"engine"
    runner = prepared.open_runner()  # constructed only: activating needs TensorRT and a GPU
    assert runner.name == "tensorrt" and runner.engine_path == folder / ENGINE_FILE
    assert runner.expected_input_spec == tiny_specs().preprocess


def test_tensorrt_preparation_needs_a_recipe(tmp_path, models):
    folder, m = staged(tmp_path, models["a"][0])
    with pytest.raises(UpdateError, match="has no engine recipe"):
        prepare_model(folder, m, TENSORRT)
    assert not (folder / PREPARED_FILE).exists()
