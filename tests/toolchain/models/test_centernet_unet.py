import torch

from toolchain.models.centernet_unet import OUTPUT_STRIDE, CenterNetUNet, ExportWrapper, build_model, count_parameters
from toolchain.training.recipes import TEACHER_ARCH


def test_output_shapes_and_stride():
    m = CenterNetUNet(3, (8, 16, 24), head_width=8).eval()
    hm, size, off = m(torch.zeros(2, 3, 64, 96))
    assert hm.shape == (2, 1, 64 // OUTPUT_STRIDE, 96 // OUTPUT_STRIDE)
    assert size.shape == hm.shape and off.shape == (2, 2, 32, 48)
    p, _, _ = ExportWrapper(m)(torch.zeros(1, 3, 64, 64))
    assert p.min().item() >= 0.0 and p.max().item() <= 1.0


def test_teacher_is_several_million_parameters_with_channels_multiple_of_8():
    m = build_model(TEACHER_ARCH)
    assert 3e6 < count_parameters(m) < 20e6
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.out_channels > 2:
            assert mod.out_channels % 8 == 0
