"""tools/prune.py and tools/distill.py end to end, on synthetic crops instead of a DICOM dataset."""

import pytest
import torch

from compression_helpers import load_tool, recording_build_samplers
from toolchain.compression.arch import HEAD_NAMES as HEADS
from toolchain.compression.arch import conv_widths_of
from toolchain.export.onnx_export import load_checkpoint


@pytest.fixture
def synthetic_data(monkeypatch):
    """build_samplers(data_dir, ...) -> crops from cached synthetic series, whatever the folder; yields the cfgs."""
    import toolchain.training.run as run

    cfgs = []
    monkeypatch.setattr(run, "build_samplers", recording_build_samplers(cfgs))
    return cfgs


def test_prune_then_distill_then_resume(tmp_path, teacher_checkpoint, synthetic_data, capsys):
    prune = load_tool("prune")
    assert prune.main(["--teacher", str(teacher_checkpoint), "--data", "unused", "--out", str(tmp_path / "p"),
                       "--target-ratio", "0.5", "--rounds", "1", "--finetune-steps", "1", "--batch-size", "2",
                       "--min-heads", "16", "--no-progress"]) == 0
    pruned = tmp_path / "p" / "pruned.pt"
    assert f"pruned checkpoint: {pruned}" in capsys.readouterr().out
    model, _ = load_checkpoint(pruned)
    teacher, _ = load_checkpoint(teacher_checkpoint)
    widths, teacher_widths = conv_widths_of(model), conv_widths_of(teacher)
    assert sum(widths.values()) < sum(teacher_widths.values())
    assert teacher_widths["heatmap.conv.0"] == 16 and all(widths[f"{h}.conv.0"] == 16 for h in HEADS)

    distill = load_tool("distill")
    common = ["--student", str(pruned), "--data", "unused", "--batch-size", "2", "--checkpoint-every", "1",
              "--val-every", "100", "--no-progress"]
    out = tmp_path / "d"
    assert distill.main(common + ["--teacher", str(teacher_checkpoint), "--out", str(out), "--steps", "1",
                                  "--heatmap-loss", "kl", "--feature-weight", "0.1"]) == 0
    assert distill.main(common + ["--teacher", str(teacher_checkpoint), "--out", str(out), "--steps", "2",
                                  "--heatmap-loss", "kl", "--feature-weight", "0.1", "--resume"]) == 0
    assert "resumed at step 1" in capsys.readouterr().out
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["card"]["mode"] == "distilled" and ckpt["card"]["name"] == "student-distilled"
    assert ckpt["card"]["positive_sampling"] == "slice" and synthetic_data[-1].positive_sampling == "slice"
    assert distill.main(common + ["--scratch", "--out", str(tmp_path / "s"), "--steps", "1",
                                  "--positive-sampling", "nodule"]) == 0
    scratch = torch.load(tmp_path / "s" / "last.pt", weights_only=True)
    assert scratch["card"]["mode"] == "scratch" and scratch["card"]["distill"] is None
    assert scratch["card"]["positive_sampling"] == "nodule" and synthetic_data[-1].positive_sampling == "nodule"
    assert scratch["arch"] == ckpt["arch"]


def test_user_errors_exit_1_with_a_message(tmp_path, teacher_checkpoint, capsys):
    distill = load_tool("distill")
    assert distill.main(["--student", str(teacher_checkpoint), "--teacher", str(teacher_checkpoint), "--scratch",
                         "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "scratch" in capsys.readouterr().err
    assert distill.main(["--student", str(teacher_checkpoint), "--data", str(tmp_path / "none"),
                         "--out", str(tmp_path / "o")]) == 1
    assert "missing split" in capsys.readouterr().err
    prune = load_tool("prune")
    assert prune.main(["--teacher", str(tmp_path / "absent.pt"), "--data", str(tmp_path),
                       "--out", str(tmp_path / "o")]) == 1
    assert "absent.pt" in capsys.readouterr().err
    assert prune.main(["--teacher", str(teacher_checkpoint), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--target-ratio", "1.5"]) == 1
    assert "target ratio" in capsys.readouterr().err
    for floor, message in ((["--min-level", "0=12"], "multiple of 8"), (["--min-conv", "nope=8"], "no prunable conv"),
                           (["--min-heads", "64"], "above its 16"), (["--min-level", "9=8"], "level must be")):
        assert prune.main(["--teacher", str(teacher_checkpoint), "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")] + floor) == 1
        err = capsys.readouterr().err
        assert message in err and "missing split" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: --device cuda is usable here")
def test_device_cuda_without_a_gpu_is_a_user_error_before_any_data_is_read(tmp_path, teacher_checkpoint, capsys):
    distill = load_tool("distill")
    assert distill.main(["--student", str(teacher_checkpoint), "--teacher", str(teacher_checkpoint),
                         "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "missing split" not in err and not (tmp_path / "o").exists()


def test_time_budget_and_cache_workers_reach_the_run(tmp_path, teacher_checkpoint, synthetic_data):
    distill = load_tool("distill")
    assert distill.main(["--student", str(teacher_checkpoint), "--data", "unused", "--out", str(tmp_path / "o"),
                         "--steps", "3", "--batch-size", "2", "--time-budget", "600", "--cache-workers", "2",
                         "--no-progress"]) == 0
    ckpt = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    assert ckpt["train_config"]["time_budget_s"] == 600 and ckpt["step"] == ckpt["total_steps"] == 3
    assert ckpt["card"]["device"] == "cpu"


def test_hard_negatives_reach_the_samplers_with_the_default_fraction(tmp_path, teacher_checkpoint, synthetic_data):
    from toolchain.training.hard_negatives import HardNegative, write_hard_negatives

    rows = [HardNegative("1.2.3.0", 2, 30.0, 40.0, 0.8)]
    write_hard_negatives(tmp_path / "h.csv", rows)
    distill = load_tool("distill")
    common = ["--student", str(teacher_checkpoint), "--data", "unused", "--steps", "1", "--batch-size", "2",
              "--no-progress", "--hard-negatives", str(tmp_path / "h.csv")]
    assert distill.main(common + ["--out", str(tmp_path / "o")]) == 0
    cfg, (given, source) = synthetic_data[-2:]
    assert cfg.hard_negative_fraction == 0.5 and given == rows and source == str(tmp_path / "h.csv")
    card = torch.load(tmp_path / "o" / "last.pt", weights_only=True)["card"]
    assert card["hard_negatives"] == str(tmp_path / "h.csv") and card["hard_negative_fraction"] == 0.5
    assert distill.main(common + ["--out", str(tmp_path / "o2"), "--hard-negative-fraction", "0.25"]) == 0
    assert synthetic_data[-2].hard_negative_fraction == 0.25


def test_hard_negative_errors_come_before_any_data_is_read(tmp_path, teacher_checkpoint, capsys):
    distill = load_tool("distill")
    common = ["--student", str(teacher_checkpoint), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    for extra, message in ((["--hard-negative-fraction", "0.5"], "needs hard negatives"),
                           (["--hard-negatives", str(tmp_path / "absent.csv")], "absent.csv"),
                           (["--hard-negatives", str(tmp_path / "absent.csv"), "--hard-negative-fraction", "2"],
                            "[0, 1]")):
        assert distill.main(common + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "missing split" not in err, err
