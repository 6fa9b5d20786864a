"""The training loop's schedule, time budget and device handling (tiny synthetic crops, CPU)."""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compression"))

from compression_helpers import make_sampler, tiny_teacher, tiny_train_config  # noqa: E402

import toolchain.training.trainer as trainer_module  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from toolchain.training.trainer import Trainer, fitted_steps, lr_at, resumed_total_steps  # noqa: E402


def test_fitted_steps_by_hand():
    # 50 steps in 10 s, 100 s budget: 90 s left at 5 steps/s -> 450 more
    assert fitted_steps(50, 10.0, 100.0, step=50, planned=10_000) == 500
    assert fitted_steps(50, 10.0, 100.0, step=250, planned=10_000) == 700  # resumed at 200: counts from here
    assert fitted_steps(50, 10.0, 100.0, step=50, planned=300) == 300  # never above the configured steps
    assert fitted_steps(50, 120.0, 100.0, step=50, planned=300) == 51  # over budget: stop after the next step
    assert fitted_steps(50, 10.0, 0.0, step=50, planned=300) == 300  # no budget


def test_lr_schedule_ends_at_two_percent_of_its_total():
    cfg = tiny_train_config(1000, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(1000, cfg) == pytest.approx(0.02) and lr_at(200, cfg, total=200) == pytest.approx(0.02)
    assert lr_at(105, cfg, total=200) == pytest.approx(0.02 + 0.98 * 0.5)  # half way down the cosine


class FakeClock:
    """time.time() that advances one second per call."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 1.0
        return self.now


def test_a_time_budget_shortens_the_run_and_still_anneals(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "time", FakeClock())
    cfg = tiny_train_config(400, warmup_steps=1, val_every=50, checkpoint_every=50, time_budget_s=100.0)
    t = Trainer(tiny_teacher(), make_sampler(), None, cfg, tmp_path, {}, progress=False)
    t.fit()
    assert 50 < t.step == t.total_steps < 400
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert len(rows) == t.step and float(rows[-1]["lr"]) == pytest.approx(0.02 * cfg.lr, rel=0.05)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["total_steps"] == t.step and ckpt["train_config"]["steps"] == 400  # the user's setting is kept
    assert resumed_total_steps(ckpt, cfg) == t.step
    assert resumed_total_steps(ckpt, tiny_train_config(800)) == 800  # a new plan on resume wins


@pytest.mark.parametrize("kw, message", [({"device": "tpu"}, "cpu or cuda"), ({"time_budget_s": -1.0}, ">= 0"),
                                         ({"batch_size": 0}, "batch size")])
def test_bad_settings_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        tiny_train_config(1, **kw).check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        tiny_train_config(1, device="cuda").check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device PyTorch can see")
def test_cuda_training_writes_a_checkpoint_that_loads_on_the_cpu(tmp_path):
    t = Trainer(tiny_teacher(), make_sampler(), make_sampler(1), tiny_train_config(2, device="cuda"), tmp_path, {},
                progress=False)
    t.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    assert all(v.device.type == "cpu" for v in state.values())
    tiny_teacher().load_state_dict(state)
