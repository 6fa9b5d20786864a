import numpy as np
import pytest
import torch

from compression_helpers import SIZE, Interrupted, InterruptingSampler, tiny_specs, tiny_teacher, tiny_train_config
from edge.errors import ConfigError, InputError
from toolchain.compression.distill import (
    DistillConfig,
    DistillLoss,
    StudentNet,
    confident_regression,
    heatmap_channel_kl,
    heatmap_focal_mse,
    make_adapter,
)
from toolchain.compression.pruning import prune_by_ratio
from toolchain.compression.student import ADAPTER_KEY, StudentTrainer, reinitialized, student_mode, train_student
from toolchain.export.onnx_export import load_checkpoint
from toolchain.training.sampling import collate
from toolchain.training.trainer import Trainer, to_tensors


def fixed_batch(sampler, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x, *targets = to_tensors(collate([sampler.sample(rng) for _ in range(n)]))
    return x, targets


def test_heatmap_terms_vanish_only_when_the_student_matches():
    t = torch.randn(2, 1, 8, 8)
    assert float(heatmap_focal_mse(t, t)) == 0.0
    assert float(heatmap_channel_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    s = t + torch.randn_like(t)
    assert float(heatmap_focal_mse(s, t)) > 0.0 and float(heatmap_channel_kl(s, t)) > 0.0


def test_regression_imitation_counts_only_confident_cells():
    prob = torch.zeros(1, 1, 4, 4)
    prob[0, 0, 1, 2] = 0.9
    prob[0, 0, 3, 3] = 0.1  # below the confidence: ignored
    teacher = torch.zeros(1, 2, 4, 4)
    student = torch.zeros(1, 2, 4, 4)
    student[0, :, 3, 3] = 5.0
    assert float(confident_regression(student, teacher, prob, 0.3)) == 0.0
    student[0, :, 1, 2] = 2.0
    assert float(confident_regression(student, teacher, prob, 0.3)) == pytest.approx(2.0)


@pytest.mark.parametrize("cfg", [
    DistillConfig(),
    DistillConfig(heatmap_loss="kl", temperature=2.0, feature_weight=0.1),
])
def test_distillation_loss_decreases_on_a_fixed_batch_and_leaves_the_teacher_alone(cfg, sampler):
    teacher = tiny_teacher(seed=1).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_by_ratio(teacher, 0.5, "l1").train()
    adapter = make_adapter(student, teacher) if cfg.feature_weight else None
    net = StudentNet(student, adapter)
    loss_fn = DistillLoss(teacher, cfg)
    x, targets = fixed_batch(sampler)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, parts = loss_fn(net, x, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"heatmap", "size", "offset", "kd_heatmap", "kd_regression"} <= set(parts)
    assert ("kd_feature" in parts) == bool(cfg.feature_weight)
    if adapter is not None:
        assert adapter.weight.grad is not None
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_without_a_teacher_only_the_task_loss_counts(sampler):
    student = tiny_teacher(seed=2, widths=(8, 16, 24), head_width=8)
    x, targets = fixed_batch(sampler, n=2)
    loss, parts = DistillLoss(None)(StudentNet(student), x, targets)
    assert set(parts) == {"heatmap", "size", "offset"}
    assert loss.item() == pytest.approx(parts["heatmap"] + 0.1 * parts["size"] + parts["offset"], rel=1e-5)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="heatmap loss"):
        DistillConfig(heatmap_loss="l2").check()
    with pytest.raises(ConfigError, match="confidence"):
        DistillConfig(confidence=1.5).check()
    with pytest.raises(ConfigError, match="scratch"):
        student_mode("teacher.pt", scratch=True)
    assert student_mode(None, scratch=True) == "scratch" and student_mode("t.pt", False) == "distilled"


def test_scratch_student_has_the_architecture_but_fresh_weights():
    student = prune_by_ratio(tiny_teacher(), 0.5, "l1")
    fresh = reinitialized(student, seed=3)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    assert not torch.equal(fresh.stem[0].weight, student.stem[0].weight)


def test_training_resumes_at_the_right_step_with_identical_results(tmp_path, sampler, val_sampler):
    teacher = tiny_teacher(seed=1).eval()
    cfg = DistillConfig(feature_weight=0.05)

    def run(out, data, resume=False):
        student = prune_by_ratio(teacher, 0.5, "l1")
        return train_student(student, tiny_specs(), data, val_sampler, tiny_train_config(4), out,
                             teacher=teacher, distill=cfg, card={"name": "s"}, progress=False, resume=resume)

    run(tmp_path / "straight", sampler)
    with pytest.raises(Interrupted):
        run(tmp_path / "split", InterruptingSampler(sampler, calls=5))  # dies in step 3 (batch size 2)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["step"] == 2
    run(tmp_path / "split", sampler, resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a[ADAPTER_KEY].items():
        assert torch.equal(v, b[ADAPTER_KEY][k]), k
    log = (tmp_path / "split" / "train_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"]
    model, specs = load_checkpoint(tmp_path / "split" / "last.pt")  # the student alone, adapter dropped
    assert specs.card["distill"]["feature_weight"] == 0.05
    assert model(torch.zeros(1, 3, SIZE, SIZE))[0].shape == (1, 1, SIZE // 2, SIZE // 2)


def test_resuming_with_other_feature_imitation_settings_is_refused(tmp_path, sampler):
    teacher = tiny_teacher(seed=1).eval()
    student = prune_by_ratio(teacher, 0.5, "l1")
    train_student(student, tiny_specs(), sampler, None, tiny_train_config(1), tmp_path, teacher=teacher,
                  progress=False)
    net = StudentNet(student, make_adapter(student, teacher))
    trainer = StudentTrainer(net, sampler, None, tiny_train_config(2), tmp_path / "x", {}, DistillLoss(None),
                             progress=False)
    with pytest.raises(InputError, match="feature imitation"):
        trainer.resume(tmp_path / "last.pt")


def test_the_loss_plugs_into_the_plain_trainer(tmp_path, sampler):
    teacher = tiny_teacher(seed=1).eval()
    student = prune_by_ratio(teacher, 0.5, "l1")
    trainer = Trainer(student, sampler, None, tiny_train_config(2), tmp_path, {"arch": "x"},
                      loss_fn=DistillLoss(teacher, DistillConfig(heatmap_loss="kl")), progress=False)
    trainer.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
