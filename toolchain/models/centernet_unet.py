"""CenterNet-style 2.5D U-Net detector for lung nodules.

Input: (N, C, H, W) from :class:`edge.preprocess.spec.PreprocessSpec` (C = slices x windows).
Outputs at stride 2 (see :mod:`edge.decode`):
  heatmap (N, 1, H/2, W/2) nodule-centre probability (sigmoid applied in the exported graph),
  size    (N, 1, H/2, W/2) nodule diameter in model-input pixels,
  offset  (N, 2, H/2, W/2) sub-cell centre offset (dy, dx) in output cells.

Why this shape: plain convolutions, BatchNorm, ReLU, nearest upsampling and
concatenation only -- every layer TensorRT fuses and runs in INT8, nothing
data-dependent in the graph (no NMS, no dynamic shapes beyond batch), so the
network prunes cleanly along channels and quantizes with per-channel weights.
The stride-2 stem keeps full-resolution work small on the CPU and the Jetson.
"""

from typing import Sequence

import torch
from torch import nn

OUTPUT_STRIDE = 2
OUTPUT_NAMES = ("heatmap", "size", "offset")


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))

    def forward(self, x):
        return self.block(x)


class Head(nn.Module):
    """3x3 conv + ReLU + 1x1 conv to ``cout`` maps."""

    def __init__(self, cin: int, mid: int, cout: int, bias_init: float = 0.0):
        super().__init__()
        self.conv = conv_bn_relu(cin, mid)
        self.out = nn.Conv2d(mid, cout, 1)
        nn.init.constant_(self.out.bias, bias_init)

    def forward(self, x):
        return self.out(self.conv(x))


class CenterNetUNet(nn.Module):
    """U-Net encoder/decoder with CenterNet heads. ``widths`` are per level, multiples of 8."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (48, 96, 192, 384), head_width: int = 64):
        super().__init__()
        widths = list(widths)
        self.in_channels = in_channels
        self.widths = widths
        self.stem = conv_bn_relu(in_channels, widths[0], stride=2)  # -> stride 2
        self.enc = nn.ModuleList([DoubleConv(widths[0], widths[0])])
        self.down = nn.ModuleList()
        for i in range(1, len(widths)):
            self.down.append(nn.MaxPool2d(2))
            self.enc.append(DoubleConv(widths[i - 1], widths[i]))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.dec.append(DoubleConv(widths[i] + widths[i - 1], widths[i - 1]))
        self.heatmap = Head(widths[0], head_width, 1, bias_init=-4.6)  # prior p ~ 0.01
        self.size = Head(widths[0], head_width, 1, bias_init=4.0)
        self.offset = Head(widths[0], head_width, 2)

    def features(self, x):
        x = self.enc[0](self.stem(x))
        skips = [x]
        for down, enc in zip(self.down, self.enc[1:]):
            x = enc(down(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return x

    def forward(self, x):
        """Training outputs: heatmap *logits*, size, offset."""
        f = self.features(x)
        return self.heatmap(f), self.size(f), self.offset(f)


class ExportWrapper(nn.Module):
    """Deployment graph: sigmoid on the heatmap, named outputs in OUTPUT_NAMES order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        hm, size, off = self.model(x)
        return torch.sigmoid(hm), size, off


def build_model(arch: dict) -> CenterNetUNet:
    """Rebuild a model from its saved architecture dict (``{"in_channels", "widths", "head_width"}``).

    An arch with ``"conv_widths"`` (a width per conv, as channel pruning leaves it)
    is built by :func:`toolchain.compression.arch.build_from_widths`.
    """
    if "conv_widths" in arch:
        from toolchain.compression.arch import build_from_widths  # lazy: compression imports this module

        return build_from_widths(arch)
    return CenterNetUNet(int(arch["in_channels"]), [int(w) for w in arch["widths"]], int(arch["head_width"]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
