import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge.errors import InputError
from test_onnx_export import save_checkpoint, tiny_model, tiny_specs
from toolchain.export.onnx_export import load_checkpoint
from toolchain.export.release import release_checkpoint

SCRIPT = Path(__file__).resolve().parents[3] / "tools" / "release_checkpoint.py"


def test_release_copy_is_half_precision_without_optimizer_and_loads_the_same_model(tmp_path):
    model = tiny_model()
    src = save_checkpoint(tmp_path / "train.pt", model, optimizer={"state": {"w": torch.zeros(10000)}}, step=7)
    out = release_checkpoint(src, tmp_path / "release.pt")
    ckpt = torch.load(out, weights_only=True)
    assert "optimizer" not in ckpt and ckpt["step"] == 7
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    loaded, specs = load_checkpoint(out)
    assert specs == tiny_specs()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for name, ref, got in zip(("heatmap", "size", "offset"), a, b):
        assert torch.allclose(ref, got, atol=2e-2, rtol=1e-2), name


def test_release_copy_can_carry_a_tuned_decode_spec(tmp_path):
    tuned = dataclasses.replace(tiny_specs().decode, min_z_span=0.6)
    out = release_checkpoint(save_checkpoint(tmp_path / "t.pt"), tmp_path / "r.pt", tuned)
    assert load_checkpoint(out)[1].decode == tuned


def test_unloadable_checkpoint_is_refused_and_nothing_written(tmp_path):
    src = save_checkpoint(tmp_path / "t.pt", arch={"in_channels": 3, "widths": [8], "head_width": 8})
    with pytest.raises(InputError, match="t.pt"):
        release_checkpoint(src, tmp_path / "r.pt")
    assert not (tmp_path / "r.pt").exists()


def test_cli_bad_decode_file_is_one_line(tmp_path):
    src = save_checkpoint(tmp_path / "t.pt")
    r = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(src), "--out", str(tmp_path / "r.pt"),
                        "--decode", str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.json" in r.stderr
