import importlib.util
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from edge.update.bundle import verify_bundle  # noqa: E402
from edge.update.golden import GoldenVectors  # noqa: E402
from edge.update.signing import TrustStore  # noqa: E402
from update_helpers import installer  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[3] / "tools" / "package_update.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("package_update_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def test_keygen_package_and_install(tmp_path, models, tool, capsys):
    assert tool.main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    onnx, _ = models["a"]
    (tmp_path / "calib.cache").write_bytes(b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\n")
    (tmp_path / "int8.json").write_text('{"precision": "int8"}')
    out = tmp_path / "tiny-1.0.0.bundle.tar.gz"
    rc = tool.main(["--onnx", str(onnx), "--key", str(tmp_path / "keys" / "update_key.pem"), "--version", "1.0.0",
                    "--release", "1", "--out", str(out), "--calib-cache", str(tmp_path / "calib.cache"),
                    "--recipe", str(tmp_path / "int8.json"), "--golden-inputs", "2", "--targets", "cpu,jetson-orin",
                    "--tensorrt-min", "8.6", "--tensorrt-below", "11", "--score-atol", "0.01"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "tiny-detector 1.0.0 release 1" in printed and "TensorRT >=8.6,<11" in printed
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["manifest.json", "manifest.sig", "payload/calibration.cache", "payload/golden.npz",
                                  "payload/model.onnx", "payload/recipe.json"]
        assert all(m.isreg() for m in tar.getmembers())
    trust = TrustStore.load(tmp_path / "keys" / "trusted_keys.json")
    m = verify_bundle(out, trust).manifest
    assert (m.calibration_cache, m.recipe, m.golden.score_atol) == ("payload/calibration.cache", "payload/recipe.json", 0.01)
    assert m.targets.tensorrt.format() == ">=8.6,<11" and m.min_runtime_version == "0.1.0"
    assert (m.expires_at - m.created_at).days == 90

    state = tmp_path / "state"
    state.mkdir()
    (state / "trusted_keys.json").write_bytes((tmp_path / "keys" / "trusted_keys.json").read_bytes())
    result = installer(state, now=lambda: m.created_at).apply(out)
    assert result.version == "1-1.0.0"
    golden = GoldenVectors.load(state / "current" / "payload" / "golden.npz")
    assert golden.inputs.shape == (2, 3, 32, 32) and golden.inputs.std() > 0.1  # phantom slices, not zeros


@pytest.mark.parametrize("extra, message", [
    (["--version", "1.2"], "'version': must be a semantic version"),
    (["--tensorrt-min", "8.6"], "--targets names no TensorRT hardware"),
    (["--tensorrt-below", "9"], "--tensorrt-below needs --tensorrt-min"),
    (["--expires-days", "0"], "--expires-days must be > 0"),
    (["--golden", "GOLDEN_B"], "the golden vectors do not match"),
    (["--calib-cache", "/nonexistent/calib.cache"], "calibration cache not found"),
])
def test_bad_requests_are_one_line_errors_and_write_nothing(tmp_path, models, signing_key, tool, capsys, extra, message):
    key = tmp_path / "key.pem"
    key.write_bytes(signing_key.to_pem())
    extra = [str(models["b"][1]) if a == "GOLDEN_B" else a for a in extra]
    out = tmp_path / "b.tar.gz"
    rc = tool.main(["--onnx", str(models["a"][0]), "--key", str(key), "--release", "1", "--out", str(out),
                    "--version", "1.0.0", "--golden", str(models["a"][1])] + extra)  # the later option wins
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]
