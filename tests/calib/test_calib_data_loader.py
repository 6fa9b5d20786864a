import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calib.data_loader import ENV_LIMIT, ENV_MANIFEST, ENV_MODEL, CalibrationDataLoader
from calib.phantom_pool import ensure_phantom_pool
from calib.selection import SelectionSettings, scan_pool, select_slices, write_manifest
from edge.decode.spec import DecodeSpec
from edge.detector import order_slices
from edge.errors import ConfigError, InputError
from edge.folder import group_series, load_series
from edge.model_file import ModelSpecs
from edge.preprocess.cpu import CpuPreprocessor, iter_network_inputs
from edge.preprocess.spec import PreprocessSpec
from toolchain.export.onnx_export import export_onnx
from toolchain.models.centernet_unet import CenterNetUNet

ROOT = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec(out_height=64, out_width=64, slices=3, pixel_size_mm=5.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader")
    pool = ensure_phantom_pool(base / "pool", series_per_profile=1, seed=1, size=64, profiles=("ge_standard", "philips_c"),
                               n_slices=10, log=lambda _: None)
    manifest = write_manifest(base / "manifest.json", select_slices(scan_pool(pool), SelectionSettings(n=8, seed=0)))
    torch.manual_seed(0)
    model = export_onnx(CenterNetUNet(3, [8, 16], 8).eval(), ModelSpecs(SPEC, DecodeSpec(stride=2)), base / "m.onnx")
    assert model is not None
    return pool, manifest, base / "m.onnx"


def runtime_inputs(pool, spec):
    """Every network input the runtime would feed, by SOP Instance UID."""
    groups, _ = group_series(pool)
    out = {}
    for g in groups:
        frames, _ = load_series(g)
        frames = order_slices(frames)
        for f, x in zip(frames, iter_network_inputs(frames, CpuPreprocessor(spec))):
            out[f.sop_uid] = x.copy()
    return out


def test_inputs_are_exactly_what_the_runtime_feeds(setup):
    pool, manifest, model = setup
    loader = CalibrationDataLoader.for_model(model, manifest, batch_size=3)
    assert loader.spec == SPEC and loader.input_name == "input" and loader.dtype == np.float32
    expected = runtime_inputs(pool, SPEC)
    batches = list(loader.batches())
    assert [b.shape[0] for b in batches] == [3, 3, 2] and len(loader) == 3
    got = np.concatenate(batches)
    for entry, x in zip(loader.entries, got):
        np.testing.assert_array_equal(x, expected[entry["sop_uid"]][0])
    feeds = list(loader)
    assert list(feeds[0]) == ["input"] and feeds[0]["input"].shape == (3, 3, 64, 64)


def test_limit_hash_and_moved_pool(setup, tmp_path):
    pool, manifest, model = setup
    a = CalibrationDataLoader.for_model(model, manifest, limit=4)
    assert a.n_slices == 4 and len(a) == 4
    assert a.sha256() == CalibrationDataLoader.for_model(model, manifest, limit=4).sha256()
    assert a.sha256() != CalibrationDataLoader.for_model(model, manifest, limit=5).sha256()
    moved = tmp_path / "moved"
    moved.symlink_to(pool)
    b = CalibrationDataLoader.for_model(model, manifest, limit=4, pool_root=moved)
    assert b.sha256() == a.sha256()
    c = CalibrationDataLoader.for_model(model, manifest, limit=1, pool_root=tmp_path)
    with pytest.raises(InputError, match="pool moved"):
        list(c.batches())


def test_refuses_what_it_cannot_feed_exactly(setup):
    pool, manifest, model = setup
    import json

    doc = json.loads(Path(manifest).read_text())
    wide = PreprocessSpec(out_height=64, out_width=64, slices=9)
    with pytest.raises(ConfigError, match="needs 4"):
        CalibrationDataLoader(doc, wide)
    doc["slices"][0]["sop_uid"] = "1.2.3"
    with pytest.raises(InputError, match="the manifest expects 1.2.3"):
        list(CalibrationDataLoader(doc, SPEC, limit=1).batches())
    with pytest.raises(ConfigError, match="batch size"):
        CalibrationDataLoader(doc, SPEC, batch_size=0)


def test_load_data_works_as_a_polygraphy_script(setup, monkeypatch):
    from polygraphy import mod

    _, manifest, model = setup
    monkeypatch.setenv(ENV_MANIFEST, str(manifest))
    monkeypatch.setenv(ENV_MODEL, str(model))
    monkeypatch.setenv(ENV_LIMIT, "3")
    load_data = mod.import_from_script(str(ROOT / "calib" / "data_loader.py"), "load_data")
    feeds = list(load_data())
    assert len(feeds) == 3 and all(f["input"].shape == (1, 3, 64, 64) for f in feeds)


def test_polygraphy_run_with_the_data_loader_script(setup, tmp_path):
    _, manifest, model = setup
    env = {ENV_MANIFEST: str(manifest), ENV_MODEL: str(model), ENV_LIMIT: "2", "PATH": str(Path(sys.executable).parent)}
    outputs = tmp_path / "outputs.json"
    r = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "run", str(model), "--onnxrt",
                        "--data-loader-script", str(ROOT / "calib" / "data_loader.py"), "--save-outputs", str(outputs)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from polygraphy.comparator import RunResults

    (_, iterations), = RunResults.load(str(outputs)).items()
    assert len(iterations) == 2  # our two slices, not polygraphy's default random input
    assert set(iterations[0]) == {"heatmap", "size", "offset"}
