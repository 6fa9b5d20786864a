import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compression_helpers import SIZE, tiny_specs, tiny_teacher, tiny_train_config
from edge.errors import ConfigError
from toolchain.compression.arch import SlimCenterNetUNet, conv_names, conv_widths_of
from toolchain.compression.checkpoint import save_checkpoint
from toolchain.compression.flops import ModelCost, model_cost
from toolchain.compression.pruning import (
    IMPORTANCE_CRITERIA,
    PruneConfig,
    accumulate_gradients,
    example_shape,
    iterative_prune,
    prune_by_ratio,
    prune_to_budget,
    round_budgets,
)
from toolchain.export.onnx_export import export_onnx, load_checkpoint

INPUT = (3, SIZE, SIZE)


def half_budget(model) -> ModelCost:
    cost = model_cost(model, example_shape(model))
    return ModelCost(cost.parameters // 2, cost.macs // 2)


@pytest.mark.parametrize("criterion", IMPORTANCE_CRITERIA)
def test_pruning_gives_a_smaller_real_network_with_intact_heads(criterion, sampler):
    teacher = tiny_teacher().eval()
    if criterion == "taylor":
        accumulate_gradients(teacher, sampler, batches=1, batch_size=2, seed=0)
    budget = half_budget(teacher)
    student = prune_to_budget(teacher, budget, criterion)
    assert isinstance(student, SlimCenterNetUNet)
    cost = model_cost(student, example_shape(student))
    assert cost.parameters <= budget.parameters and cost.macs <= budget.macs
    widths = conv_widths_of(student)
    assert all(w % 8 == 0 for w in widths.values()), widths
    assert any(w < t for w, t in zip(widths.values(), conv_widths_of(teacher).values()))
    for head in ("heatmap", "size", "offset"):  # final 1x1 convs keep their outputs and biases
        t_out, s_out = getattr(teacher, head).out, getattr(student, head).out
        assert s_out.out_channels == t_out.out_channels
        assert torch.equal(s_out.bias, t_out.bias)
    x = torch.rand(2, *INPUT)
    for t, s in zip(teacher(x), student.eval()(x)):
        assert t.shape == s.shape
    assert all(p.grad is None for p in student.parameters())


def test_magnitude_pruning_removes_the_weakest_channels():
    teacher = tiny_teacher().eval()
    with torch.no_grad():  # make stem channels 0..7 nearly dead
        teacher.stem[0].weight[:8] *= 1e-3
        teacher.stem[1].weight[:8] *= 1e-3
    student = prune_by_ratio(teacher, 0.5, "l1")
    assert student.stem[0].out_channels == 8
    assert torch.equal(student.stem[0].weight, teacher.stem[0].weight[8:])
    # the next conv lost exactly the matching input channels
    surviving_inputs = teacher.enc[0].block[0][0].weight[:, 8:]
    for row in student.enc[0].block[0][0].weight:
        assert any(torch.equal(row, t) for t in surviving_inputs)


def test_pruned_checkpoint_loads_again_and_exports(tmp_path):
    student = prune_to_budget(tiny_teacher().eval(), half_budget(tiny_teacher()), "l1").eval()
    path = save_checkpoint(tmp_path / "pruned.pt", student, tiny_specs(), {"name": "pruned"})
    loaded, specs = load_checkpoint(path)
    assert conv_widths_of(loaded) == conv_widths_of(student)
    x = torch.rand(1, *INPUT)
    for a, b in zip(loaded(x), student(x)):
        assert torch.equal(a, b)
    onnx_path = tmp_path / "pruned.onnx"
    export_onnx(loaded, specs, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hm, size, off = sess.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(hm, torch.sigmoid(student(x)[0]).detach().numpy(), atol=1e-4)
    assert off.shape == (1, 2, SIZE // 2, SIZE // 2)


def test_unreachable_budget_and_bad_criterion_are_config_errors():
    teacher = tiny_teacher()
    with pytest.raises(ConfigError, match="cannot reach"):
        prune_to_budget(teacher, ModelCost(10, 10), "l1")
    with pytest.raises(ConfigError, match="importance criterion"):
        PruneConfig(criterion="random").check()


def test_floors_stop_chosen_convs_within_the_budget():
    teacher = tiny_teacher().eval()  # widths (16, 24, 32), heads 16
    budget = half_budget(teacher)
    free = conv_widths_of(prune_to_budget(teacher, budget, "l1"))
    floors = {"heatmap.conv.0": 16, "size.conv.0": 16, "offset.conv.0": 16, "stem.0": 16}
    student = prune_to_budget(teacher, budget, "l1", min_widths=floors)
    widths = conv_widths_of(student)
    assert all(widths[name] == 16 for name in floors), widths
    assert any(free[name] < 16 for name in floors), free  # the floors changed something
    cost = model_cost(student, example_shape(student))
    assert cost.parameters <= budget.parameters and cost.macs <= budget.macs
    assert sum(widths.values()) - sum(floors.values()) <= sum(free.values()) - sum(free[n] for n in floors)


@pytest.mark.parametrize("floors, message", [
    ({"nope": 8}, "no prunable conv"),
    ({"stem.0": 12}, "multiple of 8"),
    ({"stem.0": 0}, "multiple of 8"),
    ({"stem.0": 24}, "above its 16"),
])
def test_bad_floors_are_config_errors(floors, message):
    with pytest.raises(ConfigError, match=message):
        prune_by_ratio(tiny_teacher(), 0.5, "l1", min_widths=floors)


def test_floors_that_leave_no_room_for_the_budget_are_config_errors():
    teacher = tiny_teacher()
    floors = {name: width for name, width in conv_widths_of(teacher).items()}
    with pytest.raises(ConfigError, match="lower floors"):
        prune_to_budget(teacher, half_budget(teacher), "l1", min_widths=floors)
    with pytest.raises(ConfigError, match="two floors"):
        PruneConfig(min_widths=(("stem.0", 8), ("stem.0", 16))).check()


def test_round_budgets_shrink_geometrically_to_the_target():
    budgets = round_budgets(ModelCost(1000, 5000), 0.25, 2)
    assert budgets == [ModelCost(500, 2500), ModelCost(250, 1250)]


def test_iterative_prune_writes_a_loadable_student_and_resumes(tmp_path, sampler, val_sampler):
    teacher = tiny_teacher().eval()
    cfg = PruneConfig(target_ratio=0.5, rounds=2, finetune_steps=2)
    out = tmp_path / "run"
    path = iterative_prune(teacher, tiny_specs(), sampler, val_sampler, cfg, tiny_train_config(0), out,
                           teacher_path="teacher.pt", progress=False)
    model, specs = load_checkpoint(path)
    summary = json.loads((out / "prune_summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][-1]["parameter_ratio"] <= 0.5 and summary["rounds"][-1]["mac_ratio"] <= 0.5
    assert specs.card["parameter_ratio"] == summary["rounds"][-1]["parameter_ratio"]
    assert sorted(conv_widths_of(model)) == sorted(conv_names(3))
    for k in (1, 2):
        assert torch.load(out / f"round{k}" / "last.pt", weights_only=True)["step"] == 2
    # resuming a finished run loads the rounds and reproduces the same student
    again = iterative_prune(teacher, tiny_specs(), sampler, val_sampler, cfg, tiny_train_config(0), out,
                            progress=False, resume=True)
    reloaded, _ = load_checkpoint(again)
    resumed = json.loads((out / "prune_summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert resumed["rounds"][0]["val_loss_pruned"] is None  # not re-measured for a loaded round
    assert resumed["rounds"][1]["val_loss_finetuned"] == pytest.approx(summary["rounds"][1]["val_loss_finetuned"])
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_frozen_teacher_prunes_like_a_trainable_one():
    teacher = tiny_teacher().eval()
    expected = prune_by_ratio(teacher, 0.5, "l1").state_dict()
    for p in teacher.parameters():  # as distillation leaves it
        p.requires_grad_(False)
    got = prune_by_ratio(teacher, 0.5, "l1").state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    for k, v in expected.items():
        assert torch.equal(v, got[k]), k
