"""Engine manifest: format, validation messages, and the refusal of mismatched engines."""

import dataclasses
import hashlib
import json

import pytest

from edge.engine_manifest import (
    EngineManifest,
    EngineMismatchError,
    RuntimeEnvironment,
    check_manifest,
    embedded_input_spec,
    input_spec_sha256,
    manifest_path,
    read_manifest,
    tensorrt_version_difference,
    validate_manifest,
    write_manifest,
)
from edge.errors import EdgeError, InputError
from edge.model_file import PREPROCESS_KEY
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

SPEC = PreprocessSpec(windows=(WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"]), slices=3,
                      out_height=64, out_width=48)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def manifest(**overrides) -> EngineManifest:
    fields = dict(
        tensorrt_version="10.3.0.30", device_name="Orin", compute_capability="8.7", precision="fp16",
        input_name="input", input_shape=(-1, SPEC.channels, SPEC.out_height, SPEC.out_width),
        input_dtype="float32", input_spec_sha256=input_spec_sha256(SPEC), onnx_sha256=sha("onnx"),
        engine_sha256=sha("engine"), min_batch=1, opt_batch=4, max_batch=8,
        model_metadata={PREPROCESS_KEY: SPEC.to_json()},
    )
    fields.update(overrides)
    return EngineManifest(**fields)


ORIN = RuntimeEnvironment("10.3.0.30", "Orin", "8.7", dla_cores=2)


def test_manifest_path_is_beside_the_engine(tmp_path):
    assert manifest_path(tmp_path / "student.int8.engine") == tmp_path / "student.int8.engine.manifest.json"


def test_write_then_read_round_trips_and_leaves_no_temporary_files(tmp_path):
    m = manifest(precision="int8", calibration_sha256=sha("calib"), calibration_method="entropy",
                 flags=("INT8", "FP16"), dla_core=0, gpu_fallback=True, min_batch=1, opt_batch=1, max_batch=1)
    path = write_manifest(m, tmp_path / "e.engine.manifest.json")
    assert read_manifest(path) == m
    assert json.loads(path.read_text())["input_shape"] == [-1, 6, 64, 48]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.engine.manifest.json"]


def test_read_names_the_file_when_missing_or_not_json(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: engine manifest is not JSON"):
        read_manifest(bad)


def test_unknown_and_missing_fields_are_named(tmp_path):
    d = manifest().to_dict()
    path = tmp_path / "m.json"
    path.write_text(json.dumps(dict(d, cuda_graphs=True)))
    with pytest.raises(InputError, match="unknown field.*cuda_graphs"):
        read_manifest(path)
    del d["onnx_sha256"], d["precision"]
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match="lacks field.*onnx_sha256.*precision|lacks field.*precision.*onnx_sha256"):
        read_manifest(path)


@pytest.mark.parametrize("overrides, key", [
    (dict(precision="int4"), "precision"),
    (dict(compute_capability="87"), "compute_capability"),
    (dict(tensorrt_version="ten"), "tensorrt_version"),
    (dict(input_shape=(-1, 6, 64)), "input_shape"),
    (dict(input_shape=(0, 6, 64, 48)), "input_shape"),
    (dict(input_dtype="int8"), "input_dtype"),
    (dict(onnx_sha256="abc"), "onnx_sha256"),
    (dict(min_batch=4, opt_batch=2), "opt_batch"),
    (dict(input_shape=(2, 6, 64, 48)), "max_batch"),
    (dict(precision="int8"), "calibration_sha256"),
    (dict(dla_core=0, precision="fp32", min_batch=2, opt_batch=2, max_batch=2), "precision"),
    (dict(dla_core=0), "max_batch"),  # DLA: no dynamic batch
    (dict(dla_core=-1), "dla_core"),
    (dict(hardware_compatibility="any"), "hardware_compatibility"),
    (dict(version_compatible=True, tensorrt_version="8.5.2.2"), "version_compatible"),
    (dict(format_version=2), "format_version"),
])
def test_invalid_fields_are_named(overrides, key, tmp_path):
    with pytest.raises(InputError, match=f"manifest field '{key}'"):
        manifest(**overrides).validate(tmp_path / "m.json")
    with pytest.raises(InputError, match=key):
        write_manifest(manifest(**overrides), tmp_path / "m.json")


def test_int8_from_explicit_qdq_needs_no_calibration_hash():
    manifest(precision="int8", calibration_method="qdq").validate()


def test_matching_engine_passes():
    assert check_manifest(manifest(), ORIN, expected_input_spec=SPEC, engine_sha256=sha("engine")) == []
    validate_manifest(manifest(), ORIN, expected_input_spec=SPEC)


def test_tensorrt_version_must_match_exactly_by_default():
    problems = check_manifest(manifest(), dataclasses.replace(ORIN, tensorrt_version="10.3.0.26"))
    assert len(problems) == 1
    assert "built with 10.3.0.30" in problems[0] and "has 10.3.0.26" in problems[0]
    assert check_manifest(manifest(tensorrt_version="10.3"), dataclasses.replace(ORIN, tensorrt_version="10.3.0.0")) == []


@pytest.mark.parametrize("built, runtime, ok", [
    ("10.3.0.30", "10.7.0.23", True),
    ("10.3.0.30", "10.3.0.30", True),
    ("10.7.0.23", "10.3.0.30", False),  # older runtime
    ("10.3.0.30", "11.0.0.1", True),  # 10 -> 11 supported
    ("8.6.1.6", "10.3.0.30", True),  # 8 -> 10 supported
    ("8.6.1.6", "11.0.0.1", False),  # 8 -> 11 not supported
])
def test_version_compatible_engines(built, runtime, ok):
    assert (tensorrt_version_difference(built, runtime, version_compatible=True) is None) == ok
    assert (tensorrt_version_difference(built, runtime, version_compatible=False) is None) == (built == runtime)


def test_compute_capability_mismatch_names_both_devices():
    xavier = RuntimeEnvironment("10.3.0.30", "Xavier", "7.2")
    (problem,) = check_manifest(manifest(), xavier)
    assert "sm 8.7 (Orin)" in problem and "sm 7.2 (Xavier)" in problem


def test_other_device_model_with_same_compute_capability():
    a6000 = RuntimeEnvironment("10.3.0.30", "NVIDIA RTX A6000", "8.6")
    m = manifest(device_name="NVIDIA GeForce RTX 3090", compute_capability="8.6")
    (problem,) = check_manifest(m, a6000)
    assert "GPU model differs" in problem and "RTX 3090" in problem and "A6000" in problem
    assert check_manifest(m, a6000, allow_other_device_model=True) == []
    assert check_manifest(dataclasses.replace(m, hardware_compatibility="same_compute_capability"), a6000) == []


def test_ampere_plus_engines_run_on_newer_gpus_only():
    m = manifest(device_name="NVIDIA A100", compute_capability="8.0", hardware_compatibility="ampere_plus")
    assert check_manifest(m, RuntimeEnvironment("10.3.0.30", "NVIDIA H100", "9.0")) == []
    (problem,) = check_manifest(m, RuntimeEnvironment("10.3.0.30", "Tesla T4", "7.5"))
    assert "sm >= 8.0" in problem and "7.5" in problem


def test_dla_core_must_exist():
    dla1 = manifest(dla_core=1, opt_batch=1, max_batch=1)
    (problem,) = check_manifest(dla1, dataclasses.replace(ORIN, dla_cores=1))
    assert "DLA core 1" in problem and "1 DLA core(s)" in problem
    assert check_manifest(dla1, ORIN) == []


def test_input_spec_mismatches_are_reported():
    other_window = dataclasses.replace(SPEC, windows=(WINDOW_PRESETS["lung"], WINDOW_PRESETS["bone"]))
    (problem,) = check_manifest(manifest(), ORIN, expected_input_spec=other_window)
    assert problem.startswith("input spec differs")
    half = dataclasses.replace(SPEC, dtype="float16")
    assert any("input dtype differs" in p for p in check_manifest(manifest(), ORIN, expected_input_spec=half))
    bigger = dataclasses.replace(SPEC, out_height=96)
    assert any("input shape differs" in p and "[N, 6, 96, 48]" in p
               for p in check_manifest(manifest(), ORIN, expected_input_spec=bigger))


def test_validate_lists_every_difference_in_one_user_facing_error():
    xavier_85 = RuntimeEnvironment("8.5.2.2", "Xavier", "7.2")
    with pytest.raises(EngineMismatchError) as info:
        validate_manifest(manifest(), xavier_85, engine_path="models/student.engine",
                          engine_sha256=sha("other engine"))
    message = str(info.value)
    assert isinstance(info.value, EdgeError)
    assert message.startswith("models/student.engine: refusing this engine")
    for part in ("engine file differs", "TensorRT version differs", "compute capability differs",
                 "tools/build_engine.py"):
        assert part in message


def test_input_spec_hash_is_canonical():
    assert input_spec_sha256(SPEC) == hashlib.sha256(SPEC.to_json().encode()).hexdigest()
    assert input_spec_sha256(PreprocessSpec.from_json(SPEC.to_json())) == input_spec_sha256(SPEC)
    assert input_spec_sha256(dataclasses.replace(SPEC, mean=0.1)) != input_spec_sha256(SPEC)


def test_embedded_spec_is_checked_against_its_hash():
    assert embedded_input_spec(manifest()) == SPEC
    assert embedded_input_spec(manifest(model_metadata={})) is None
    tampered = manifest(model_metadata={PREPROCESS_KEY: dataclasses.replace(SPEC, std=2.0).to_json()})
    with pytest.raises(InputError, match="does not match its input_spec_sha256"):
        embedded_input_spec(tampered)


def test_build_inputs_ignore_what_a_build_produces():
    a = manifest(build_time_utc="2026-01-01T00:00:00Z", builder="build_engine 1")
    b = dataclasses.replace(a, engine_sha256=sha("rebuilt"), build_time_utc="2026-02-02T00:00:00Z")
    assert a.build_inputs() == b.build_inputs()
    assert a.build_inputs() != dataclasses.replace(a, onnx_sha256=sha("new onnx")).build_inputs()
    assert "engine_sha256" not in a.build_inputs()
