import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge.errors import InputError
from test_onnx_export import save_checkpoint, tiny_model, tiny_specs
from toolchain.export.average import average_checkpoints
from toolchain.export.onnx_export import load_checkpoint

SCRIPT = Path(__file__).resolve().parents[3] / "tools" / "average_checkpoints.py"


def test_average_is_the_mean_of_every_float_tensor_and_loads(tmp_path):
    models = [tiny_model(seed) for seed in (0, 1, 2)]
    srcs = [save_checkpoint(tmp_path / f"m{i}.pt", m, step=10 * i) for i, m in enumerate(models)]
    out = average_checkpoints(srcs, tmp_path / "soup.pt")
    ckpt = torch.load(out, weights_only=True)
    for k, v in models[0].state_dict().items():
        if v.is_floating_point():
            expected = sum(m.state_dict()[k] for m in models) / 3
            assert torch.allclose(ckpt["state_dict"][k], expected, atol=1e-6), k
        else:
            assert torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["card"]["averaged_from"] == [str(s) for s in srcs] and "optimizer" not in ckpt
    model, specs = load_checkpoint(out)
    assert specs.preprocess == tiny_specs().preprocess


def test_averaging_a_checkpoint_with_itself_changes_nothing(tmp_path):
    model = tiny_model()
    src = save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_checkpoint(average_checkpoints([src, src], tmp_path / "soup.pt"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for ref, got in zip(model(x), loaded(x)):
            assert torch.allclose(ref, got, atol=1e-6)


def test_different_preprocessing_is_refused_naming_the_file_and_nothing_written(tmp_path):
    a = save_checkpoint(tmp_path / "a.pt")
    b = save_checkpoint(tmp_path / "b.pt", specs=tiny_specs(slices=1), state_dict=tiny_model().state_dict())
    with pytest.raises(InputError, match="b.pt.*preprocess"):
        average_checkpoints([a, b], tmp_path / "soup.pt")
    assert not list(tmp_path.glob("*soup*"))


def test_one_checkpoint_is_not_an_average(tmp_path):
    with pytest.raises(InputError, match="at least two"):
        average_checkpoints([save_checkpoint(tmp_path / "a.pt")], tmp_path / "soup.pt")


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    a = save_checkpoint(tmp_path / "a.pt")
    r = subprocess.run([sys.executable, str(SCRIPT), str(a), str(tmp_path / "missing.pt"), "--out",
                        str(tmp_path / "soup.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.pt" in r.stderr
