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
    peak_cells,
    peak_matching,
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


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p) - torch.log1p(-p)


def test_peak_cells_are_local_maxima_over_the_threshold():
    prob = torch.full((1, 1, 6, 6), 0.01)
    prob[0, 0, 1, 1] = 0.6
    prob[0, 0, 1, 2] = 0.4  # next to a higher cell: not a peak
    prob[0, 0, 4, 4] = 0.04  # a local maximum under the threshold
    cells = peak_cells(prob, 0.05)
    assert cells.sum() == 1 and bool(cells[0, 0, 1, 1])


def test_peak_matching_weighs_every_peak_the_same_and_ignores_other_cells():
    ring = torch.maximum((torch.arange(7)[:, None] - 3).abs(), (torch.arange(7)[None, :] - 3).abs())  # Chebyshev
    teacher = torch.full((1, 1, 12, 12), 0.001)
    teacher[0, 0, 2:9, 2:9] = 0.9 - 0.1 * ring  # a large nodule: a 7x7 blob with one peak (0.9)
    teacher[0, 0, 10, 10] = 0.6  # a small nodule: one cell
    t = _logit(teacher)
    assert float(peak_matching(t, t, 0.05)) == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[0, 0, 2:9, 2:9] = _logit(0.9 - 0.12 * ring)  # every blob cell but its peak differs: no new peak
    assert float(peak_matching(s, t, 0.05)) == pytest.approx(0.0, abs=1e-6)
    small_missed = t.clone()
    small_missed[0, 0, 10, 10] = _logit(0.01)  # the student misses the small nodule
    large_missed = t.clone()
    large_missed[0, 0, 2:9, 2:9] = _logit(0.01)  # ... or the whole large one
    kl = lambda p, q: p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))  # noqa: E731
    # two peaks in the teacher's map, none added by the student: each miss is half the mean KL
    assert float(peak_matching(small_missed, t, 0.05)) == pytest.approx(kl(0.6, 0.01) / 2, rel=1e-4)
    assert float(peak_matching(large_missed, t, 0.05)) == pytest.approx(kl(0.9, 0.01) / 2, rel=1e-4)
    spurious = t.clone()
    spurious[0, 0, 0, 11] = _logit(0.4)  # a student peak where the teacher sees nothing
    assert float(peak_matching(spurious, t, 0.05)) == pytest.approx(kl(0.001, 0.4) / 3, rel=1e-4)


def test_peak_matching_trains_the_student_only():
    t = _logit(torch.tensor([[[[0.01, 0.01, 0.01], [0.01, 0.8, 0.01], [0.01, 0.01, 0.01]]]]))
    s = t.clone()
    s[0, 0, 1, 1] = _logit(0.2)
    s.requires_grad_(True)
    peak_matching(s, t, 0.05).backward()
    assert s.grad[0, 0, 1, 1] < 0  # raise the student's score at the teacher's peak
    assert float(s.grad.abs().sum() - s.grad[0, 0, 1, 1].abs()) == 0.0


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
    DistillConfig(peak_weight=1.0),
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
    with pytest.raises(ConfigError, match="peak threshold"):
        DistillConfig(peak_threshold=0.0).check()
    with pytest.raises(ConfigError, match="peak_weight"):
        DistillConfig(peak_weight=-1.0).check()
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
