import sys
from pathlib import Path

import pytest
import torch

from edge.errors import InputError
from toolchain.models.centernet_unet import CenterNetUNet
from toolchain.training.run import load_initial_weights


def test_initial_weights_are_copied(tmp_path):
    torch.manual_seed(0)
    src = CenterNetUNet(3, [8, 16], 8)
    torch.save({"state_dict": {k: v.half() for k, v in src.state_dict().items()}, "step": 5}, tmp_path / "a.pt")
    torch.manual_seed(1)
    dst = CenterNetUNet(3, [8, 16], 8)
    load_initial_weights(dst, tmp_path / "a.pt")
    for (k, v), w in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-2), k


def test_initial_weights_from_another_architecture_name_the_file(tmp_path):
    torch.save({"state_dict": CenterNetUNet(3, [8, 16], 8).state_dict()}, tmp_path / "a.pt")
    with pytest.raises(InputError, match="a.pt.*does not fit"):
        load_initial_weights(CenterNetUNet(3, [16, 16], 8), tmp_path / "a.pt")
    with pytest.raises(InputError, match="not found"):
        load_initial_weights(CenterNetUNet(3, [8, 16], 8), tmp_path / "missing.pt")


def test_initial_weights_from_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(InputError, match="junk.pt.*not a training checkpoint"):
        load_initial_weights(CenterNetUNet(3, [8, 16], 8), tmp_path / "junk.pt")


def test_train_detector_passes_the_positive_sampling_on_and_records_it(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compression"))
    from compression_helpers import recording_build_samplers

    import toolchain.training.run as run

    cfgs = []
    monkeypatch.setattr(run, "build_samplers", recording_build_samplers(cfgs))
    arch = {"in_channels": 3, "widths": [8, 16], "head_width": 8}
    run.train_detector("unused", tmp_path, arch=arch, steps=1, batch_size=2, progress=False,
                       positive_sampling="nodule")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert cfgs[0].positive_sampling == "nodule" and ckpt["card"]["positive_sampling"] == "nodule"


def test_cache_workers_below_one_is_a_config_error(tmp_path):
    from edge.errors import ConfigError
    from toolchain.training.recipes import DEFAULT_PREPROCESS
    from toolchain.training.run import build_samplers

    with pytest.raises(ConfigError, match="cache workers"):
        build_samplers(tmp_path, DEFAULT_PREPROCESS, 2, workers=0)


def test_build_samplers_places_hard_negatives_on_the_training_series(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "edge" / "ingest"))
    from ingest_helpers import write_series

    from edge.preprocess.spec import PreprocessSpec
    from toolchain.training.hard_negatives import HardNegative
    from toolchain.training.run import build_samplers
    from toolchain.training.sampling import AugmentConfig

    series = {}
    for split in ("train", "val"):
        series[split] = write_series(tmp_path / split / "s", n_slices=5, spheres=(), seed=len(split))
        (tmp_path / split / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    spec = PreprocessSpec(out_height=32, out_width=32, slices=3)
    on_train = HardNegative(series["train"].series_uid, 3, 10.0, 12.0, 0.7)
    on_val = HardNegative(series["val"].series_uid, 1, 5.0, 5.0, 0.9)
    train, val = build_samplers(tmp_path, spec, 2, AugmentConfig(crop=32, hard_negative_fraction=0.5),
                                hard_negatives=[on_train, on_val], hard_negatives_source="h.csv")
    assert train.hard_negatives == [(0, 3, 10.0, 12.0)] and val.hard_negatives == []
    with pytest.raises(InputError, match="none of its rows") as e:
        build_samplers(tmp_path, spec, 2, hard_negatives=[on_val], hard_negatives_source="h.csv")
    assert "h.csv" in str(e.value)
