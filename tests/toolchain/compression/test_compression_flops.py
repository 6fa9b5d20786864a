from torch import nn

from toolchain.compression.flops import count_macs, count_parameters, model_cost
from toolchain.models.centernet_unet import CenterNetUNet


def test_conv_macs_match_hand_computation():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    # output 8 x 5 x 5, each a 3x3x3 dot product
    assert count_macs(conv, (3, 10, 10)) == 8 * 5 * 5 * 3 * 3 * 3
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
    assert count_macs(grouped, (8, 6, 6)) == 16 * 6 * 6 * 2 * 3 * 3
    assert count_parameters(conv) == 8 * 3 * 3 * 3 + 8


def test_macs_add_over_layers_and_ignore_parameter_free_ops():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    assert count_macs(net, (3, 4, 4)) == 4 * 4 * 4 * 3 + 5 * 16
    net.train()
    count_macs(net, (3, 4, 4))
    assert net.training  # mode restored


def test_detector_macs_scale_with_input_area():
    model = CenterNetUNet(3, (8, 16, 24), 8)
    small, large = model_cost(model, (3, 32, 32)), model_cost(model, (3, 64, 96))
    assert large.macs == small.macs * 6
    assert small.parameters == large.parameters == count_parameters(model)
