import pytest
import torch

from toolchain.compression.arch import (
    CONV_WIDTHS_KEY,
    SlimCenterNetUNet,
    arch_of,
    build_from_widths,
    conv_names,
    conv_widths_of,
    uniform_conv_widths,
)
from toolchain.models.centernet_unet import CenterNetUNet


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("widths", [(8,), (8, 16, 24), (16, 24, 32, 40)])
def test_uniform_widths_rebuild_the_parent_exactly(widths):
    torch.manual_seed(0)
    parent = CenterNetUNet(3, widths, 8).eval()
    slim = build_from_widths({"in_channels": 3, "widths": list(widths), "head_width": 8}).eval()
    assert isinstance(slim, SlimCenterNetUNet)
    assert shapes(slim) == shapes(parent)
    assert conv_widths_of(parent) == uniform_conv_widths(list(widths), 8)
    assert sorted(conv_widths_of(parent)) == sorted(conv_names(len(widths)))
    slim.load_state_dict(parent.state_dict())
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(slim(x), parent(x)):
        assert torch.equal(a, b)
    # the heads keep the parent's priors
    assert torch.equal(slim.heatmap.out.bias, parent.heatmap.out.bias)


def test_per_conv_widths_build_a_network_with_those_widths():
    cw = {"stem.0": 8, "enc.0.block.0.0": 16, "enc.1.block.0.0": 8, "enc.1.block.1.0": 24,
          "dec.0.block.0.0": 40, "dec.0.block.1.0": 8, "heatmap.conv.0": 8, "offset.conv.0": 24}
    arch = {"in_channels": 3, "widths": [16, 32], "head_width": 16, CONV_WIDTHS_KEY: cw}
    model = build_from_widths(arch)
    got = conv_widths_of(model)
    for name, w in cw.items():
        assert got[name] == w
    assert got["size.conv.0"] == 16 and got["enc.0.block.1.0"] == 16  # not overridden: the level/head defaults
    assert model.widths == [16, 24]
    assert model.dec[0].block[0][0].in_channels == 24 + 16  # upsampled path + skip
    hm, size, off = model(torch.rand(2, 3, 32, 32))
    assert hm.shape == size.shape == (2, 1, 16, 16) and off.shape == (2, 2, 16, 16)
    again = build_from_widths(arch_of(model))
    assert shapes(again) == shapes(model)


@pytest.mark.parametrize("conv_widths, message", [
    ({"enc.9.block.0.0": 8}, "unknown conv"),
    ({"stem.0": 0}, "positive integer"),
    ({"stem.0": 8.0}, "positive integer"),
])
def test_bad_conv_widths_are_rejected(conv_widths, message):
    with pytest.raises(ValueError, match=message):
        build_from_widths({"in_channels": 3, "widths": [8, 16], "head_width": 8, CONV_WIDTHS_KEY: conv_widths})


def test_a_non_uniform_checkpoint_loads_through_the_export_loader(tmp_path):
    from compression_helpers import tiny_specs
    from toolchain.compression.checkpoint import save_checkpoint
    from toolchain.export.onnx_export import load_checkpoint

    cw = {"enc.0.block.0.0": 24, "dec.1.block.0.0": 8, "size.conv.0": 24}
    model = build_from_widths({"in_channels": 3, "widths": [16, 24, 32], "head_width": 16, CONV_WIDTHS_KEY: cw})
    path = save_checkpoint(tmp_path / "slim.pt", model.eval(), tiny_specs(), {"name": "slim"})
    # needs toolchain.models.centernet_unet.build_model to hand archs with conv_widths to build_from_widths
    loaded, _ = load_checkpoint(path)
    assert conv_widths_of(loaded) == conv_widths_of(model)
    x = torch.rand(1, 3, 32, 32)
    for a, b in zip(loaded(x), model(x)):
        assert torch.equal(a, b)
