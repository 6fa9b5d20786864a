import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from calib.phantom_pool import ensure_phantom_pool
from calib.qdq_check import check_qdq_file
from calib.ranges import DEFAULT_METHOD
from calib.trt_cache import read_calibration_cache
from edge.decode.spec import DecodeSpec
from edge.model_file import ModelSpecs, read_model_specs
from edge.preprocess.spec import PreprocessSpec
from engines.builder import BuildResult
from toolchain.export.onnx_export import export_onnx
from toolchain.models.centernet_unet import CenterNetUNet

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "build_engine.py"
SPECS = ModelSpecs(PreprocessSpec(out_height=64, out_width=64, slices=3, pixel_size_mm=5.0), DecodeSpec(stride=2))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = base / "student.onnx"
    export_onnx(CenterNetUNet(3, [8, 16], 8).eval(), SPECS, model)
    pool = ensure_phantom_pool(base / "pool", series_per_profile=1, seed=0, size=64, profiles=("ge_lung", "toshiba_fc13"),
                               n_slices=10, log=lambda _: None)
    return model, pool


def load_cli():
    spec = importlib.util.spec_from_file_location("build_engine_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int8_without_tensorrt_does_every_step_then_exits_3(inputs, tmp_path):
    model, pool = inputs
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--int8", "--onnx", str(model), "--calib-pool", str(pool),
                        "--calib-size", "12", "--calib-method", "entropy", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("engine not built: TensorRT is not installed here")
    assert "student.orin-jp6.int8.engine" in r.stderr
    assert "selected 12 calibration slice(s) from 20 in 2 series" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["calibration_manifest.json", "student.entropy.ranges.json", "student.histograms.npz",
                     "student.int8.cpu.onnx", "student.int8.qdq.onnx", "student.qdq_check.txt",
                     "student.trt-100300.calib.cache"]
    report = check_qdq_file(out / "student.int8.qdq.onnx")  # TensorRT's rules (the CPU layout has uint8)
    assert report.ok and report.quantized_weighted_nodes == report.weighted_nodes == 13
    for layout in ("qdq", "cpu"):
        assert read_model_specs(out / f"student.int8.{layout}.onnx") == SPECS
    assert read_calibration_cache(out / "student.trt-100300.calib.cache").version == 100300
    manifest = json.loads((out / "calibration_manifest.json").read_text())
    assert manifest["selected"] == 12 and manifest["pool"]["profiles_from"] == "series.csv"


def test_dla_target_gets_a_cache_for_its_tensorrt(inputs, tmp_path, capsys):
    model, pool = inputs
    rc = load_cli().main(["--int8", "--target", "xavier-jp5-dla", "--dla-core", "1", "--onnx", str(model),
                          "--calib-pool", str(pool), "--calib-size", "6", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3 and "student.xavier-jp5-dla.int8.engine" in err and "TensorRT 8.5.2" in err
    assert read_calibration_cache(tmp_path / "student.trt-8502.calib.cache").algorithm == "EntropyCalibration2"


def test_defaults_use_the_committed_model_and_the_phantom_pool(inputs, tmp_path, monkeypatch, capsys):
    model, pool = inputs
    cli = load_cli()
    made = []

    def small_pool(pool_dir):
        made.append(pool_dir)
        return pool

    monkeypatch.setattr(cli, "default_model", lambda: model)
    monkeypatch.setattr(cli, "ensure_phantom_pool", small_pool)
    monkeypatch.setattr(cli, "DEFAULT_OUT", tmp_path / "built")
    rc = cli.main(["--int8", "--calib-size", "5", "--out", str(tmp_path / "built")])
    assert rc == 3 and made == [cli.DEFAULT_POOL_DIR]
    assert (tmp_path / "built" / "student.int8.qdq.onnx").is_file()
    assert capsys.readouterr().err.count("\n") == 1


def test_given_qdq_model_skips_calibration_and_reaches_the_build(inputs, tmp_path, monkeypatch, capsys):
    model, pool = inputs
    cli = load_cli()
    assert cli.main(["--int8", "--onnx", str(model), "--calib-pool", str(pool), "--calib-size", "4",
                     "--out", str(tmp_path)]) == 3
    capsys.readouterr()
    seen = []

    def fake_build(request, force=False, repo_root=None):
        seen.append(request)
        return BuildResult(request.engine_path, None, False, "up to date: every build input unchanged")

    monkeypatch.setattr(cli, "build_engine", fake_build)
    qdq = tmp_path / "student.int8.qdq.onnx"
    rc = cli.main(["--int8", "--onnx", str(model), "--qdq-onnx", str(qdq), "--out", str(tmp_path / "again")])
    assert rc == 0 and "not rebuilt" in capsys.readouterr().out
    (req,) = seen
    info = json.loads({p.key: p.value for p in onnx.load(str(qdq)).metadata_props}["ct_edge.quantization"])
    assert req.onnx_path == qdq and req.calibration_sha256 == info["calibration_sha256"]
    assert req.calibration_method == info["method"] == DEFAULT_METHOD
    assert not (tmp_path / "again" / "calibration_manifest.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--int8", "--target", "jetson-nano"], "unknown target 'jetson-nano'"),
    (["--fp32", "--target", "orin-jp6-dla"], "--fp32: target orin-jp6-dla builds int8, fp16 only"),
    (["--fp16", "--target", "workstation-trt11"], "--fp16: target workstation-trt11 builds int8, fp32 only"),
    (["--int8", "--dla-core", "0"], "--dla-core: target orin-jp6 builds for the GPU"),
    (["--int8", "--target", "xavier-jp5", "--version-compatible"], "version_compatible: needs TensorRT >= 8.6"),
    (["--int8", "--calib-cache", "x.cache"], "give --qdq-onnx, not --calib-cache"),
    (["--int8", "--target", "orin-jp6-dla", "--qdq-onnx", "m.onnx"], "give --calib-cache"),
    (["--int8", "--calib-size", "0"], "--calib-size must be at least 1"),
])
def test_bad_options_are_one_line_errors(inputs, tmp_path, capsys, argv, message):
    model, _ = inputs
    rc = load_cli().main(argv + ["--onnx", str(model), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_precision_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        load_cli().main(["--target", "orin-jp6"])
    assert e.value.code == 2
