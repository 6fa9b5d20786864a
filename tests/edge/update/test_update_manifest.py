import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.update.errors import ManifestError
from edge.update.manifest import (
    FileEntry,
    GoldenSpec,
    Manifest,
    Targets,
    TensorRTRange,
    canonical_json,
    compare_versions,
    is_payload_path,
    parse_manifest,
)

SHA = "ab" * 32


def manifest(**overrides) -> Manifest:
    fields = dict(
        model="tiny-detector", version="1.2.0", release=7, created="2030-01-01T00:00:00Z",
        expires="2030-04-01T00:00:00Z", min_runtime_version="0.1.0",
        targets=Targets(("cpu", "jetson-orin"), TensorRTRange("8.6", "11")), key_id="0123456789abcdef",
        model_file="payload/model.onnx", golden=GoldenSpec("payload/golden.npz"),
        files={"payload/model.onnx": FileEntry(SHA, 10), "payload/golden.npz": FileEntry(SHA, 20)},
    )
    fields.update(overrides)
    return Manifest(**fields)


def as_dict(**overrides) -> dict:
    return manifest(**overrides).to_dict()


def test_round_trip_is_canonical_and_exact():
    m = manifest(calibration_cache="payload/calibration.cache",
                 files={"payload/model.onnx": FileEntry(SHA, 10), "payload/golden.npz": FileEntry(SHA, 20),
                        "payload/calibration.cache": FileEntry("0" * 64, 0)})
    data = m.to_bytes()
    assert parse_manifest(data) == m
    assert data == canonical_json(json.loads(data))
    assert b" " not in data and b"\n" not in data
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    assert m.version_name == "7-1.2.0" and m.total_size == 30


@pytest.mark.parametrize("mutate, field, message", [
    (lambda d: d.pop("release"), "release", "is missing"),
    (lambda d: d.update(release="7"), "release", "must be an integer"),
    (lambda d: d.update(release=True), "release", "must be an integer"),
    (lambda d: d.update(release=0), "release", "must be an integer in 1.."),
    (lambda d: d.update(colour="red"), "colour", "is not a known field"),
    (lambda d: d.update(version="1.2"), "version", "semantic version"),
    (lambda d: d.update(model="../evil"), "model", "model name"),
    (lambda d: d.update(expires="2030-02-30T00:00:00Z"), "expires", "UTC timestamp"),
    (lambda d: d.update(expires="2029-01-01T00:00:00Z"), "expires", "is not after created"),
    (lambda d: d.update(created="2030-01-01 00:00:00"), "created", "UTC timestamp"),
    (lambda d: d.update(format=2), "format", "reads format 1"),
    (lambda d: d["targets"].update(hardware=[]), "targets.hardware", "non-empty list"),
    (lambda d: d["targets"].update(hardware=["cpu", "cpu"]), "targets.hardware", "distinct"),
    (lambda d: d["targets"]["tensorrt"].update(below="8.5"), "targets.tensorrt.below", "above min"),
    (lambda d: d["targets"]["tensorrt"].pop("min"), "targets.tensorrt.min", "is missing"),
    (lambda d: d.update(key_id="XYZ"), "key_id", "16 lowercase hex"),
    (lambda d: d.update(model_file="payload/other.onnx"), "model_file", "not listed in 'files'"),
    (lambda d: d.update(model_file="/etc/passwd"), "model_file", "payload/... path"),
    (lambda d: d.update(recipe=5), "recipe", "payload/... path or null"),
    (lambda d: d["golden"].update(score_atol=-1.0), "golden.score_atol", "number in"),
    (lambda d: d["golden"].update(score_atol="0.1"), "golden.score_atol", "number in"),
    (lambda d: d["files"].update({"payload/../x": {"sha256": SHA, "size": 1}}), "files", "not a payload"),
    (lambda d: d["files"].update({"payload/model.onnx/x": {"sha256": SHA, "size": 1}}), "files", "as a folder"),
    (lambda d: d["files"]["payload/model.onnx"].update(sha256="AB" * 32), "files[payload/model.onnx].sha256", "hex"),
    (lambda d: d["files"]["payload/model.onnx"].update(size=-1), "files[payload/model.onnx].size", "integer"),
    (lambda d: d["files"]["payload/model.onnx"].update(mode=7), "files[payload/model.onnx].mode", "not a known"),
    (lambda d: d.update(files={}), "files", "non-empty"),
])
def test_bad_field_is_a_manifest_error_naming_it(mutate, field, message):
    d = as_dict()
    mutate(d)
    with pytest.raises(ManifestError) as e:
        parse_manifest(canonical_json(d), "b.tar:manifest.json")
    assert e.value.field == field
    assert message in str(e.value) and str(e.value).startswith("b.tar:manifest.json: ")


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b'{"release":NaN}', "non-JSON number"),
    (b"1" * 5000, "not valid JSON"),
])
def test_garbage_is_a_manifest_error(data, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data)


def test_duplicate_keys_and_non_canonical_encodings_are_refused():
    data = canonical_json(as_dict())
    dup = data[:-1] + b',"release":8}'
    with pytest.raises(ManifestError) as e:
        parse_manifest(dup)
    assert e.value.field == "release" and "more than once" in str(e.value)
    with pytest.raises(ManifestError, match="canonical"):
        parse_manifest(json.dumps(as_dict(), indent=1).encode())
    with pytest.raises(ManifestError, match="canonical"):
        parse_manifest(json.dumps(as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b" ")


def test_versions_and_paths():
    assert compare_versions("8.6", "8.6.0") == 0
    assert compare_versions("10.3.0.30", "10.3") == 1
    assert compare_versions("8.5.2", "8.6") == -1
    assert compare_versions("1.2.0-rc.1", "1.2.0") == 0
    assert TensorRTRange("8.6", "11").contains("10.3.0") and not TensorRTRange("8.6", "11").contains("11.0")
    assert TensorRTRange("8.6").contains("99")
    assert is_payload_path("payload/a/b.onnx")
    for bad in ("payload", "payload/", "/payload/a", "payload/../a", "payload/./a", "payload//a", "payload/.a",
                "other/a", "payload\\a", "payload/a\\..\\b", 5, None):
        assert not is_payload_path(bad), bad


# --- fuzzing: whatever the input, a Manifest or a ManifestError ------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def _parse_or_typed_error(data: bytes):
    try:
        return parse_manifest(data)
    except ManifestError as e:
        assert isinstance(e.field, str)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_any_bytes(data):
    _parse_or_typed_error(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_any_json(value):
    _parse_or_typed_error(json.dumps(value).encode())
    try:
        _parse_or_typed_error(canonical_json(value))
    except ValueError:
        pass  # value itself cannot be serialised canonically (hypothesis gave e.g. a float NaN)


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_one_field_of_a_valid_manifest(data):
    d = as_dict()
    paths = [p for p in _paths(d) if p]
    path = data.draw(st.sampled_from(paths))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
    try:
        raw = canonical_json(d)
    except ValueError:
        return
    result = _parse_or_typed_error(raw)
    if result is not None:  # whatever parses must round-trip to the same bytes
        assert canonical_json(json.loads(raw)) == raw and parse_manifest(raw) == result


@settings(max_examples=100, deadline=None)
@given(release=st.integers(1, 2**53 - 1), size=st.integers(0, 2**40),
       hw=st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True), min_size=1, max_size=4, unique=True),
       atol=st.floats(0, 1), version=st.from_regex(r"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,2})\.(0|[1-9])(-rc\.[0-9])?",
                                                   fullmatch=True))
def test_fuzz_valid_manifests_round_trip(release, size, hw, atol, version):
    m = manifest(release=release, version=version, targets=Targets(tuple(hw), None),
                 golden=GoldenSpec("payload/golden.npz", heatmap_atol=atol),
                 files={"payload/model.onnx": FileEntry(SHA, size), "payload/golden.npz": FileEntry(SHA, 1)})
    assert parse_manifest(m.to_bytes()) == m
