"""The detector with a width per convolution: the architecture channel pruning leaves.

Pruning gives every 3x3 convolution its own output width (the two convs of a
DoubleConv, each decoder level, each head). The saved architecture dict is the
teacher's (``in_channels``, ``widths``, ``head_width``) plus ``conv_widths``:
``{conv module name: output channels}``, e.g. ``{"stem.0": 24, "enc.0.block.0.0": 24, ...}``.
Input widths follow from the graph (a decoder conv takes the upsampled path
plus the skip), so output widths describe the network completely. Module names
and the forward pass are :class:`CenterNetUNet`'s, so state dicts carry over.
"""

from typing import Dict, List, Mapping

import torch
from torch import nn

from toolchain.models.centernet_unet import CenterNetUNet, DoubleConv, Head, conv_bn_relu

CONV_WIDTHS_KEY = "conv_widths"
HEAD_NAMES = ("heatmap", "size", "offset")


def conv_names(levels: int) -> List[str]:
    """Names of the prunable convolutions (every conv but the heads' final 1x1) of a ``levels``-level model."""
    names = ["stem.0"]
    names += [f"enc.{i}.block.{k}.0" for i in range(levels) for k in (0, 1)]
    names += [f"dec.{j}.block.{k}.0" for j in range(levels - 1) for k in (0, 1)]
    names += [f"{h}.conv.0" for h in HEAD_NAMES]
    return names


def uniform_conv_widths(widths, head_width: int) -> Dict[str, int]:
    """The per-conv widths of an unpruned model with per-level ``widths``."""
    levels = len(widths)
    out = {"stem.0": widths[0]}
    for i in range(levels):
        out[f"enc.{i}.block.0.0"] = out[f"enc.{i}.block.1.0"] = widths[i]
    for j, i in enumerate(range(levels - 1, 0, -1)):
        out[f"dec.{j}.block.0.0"] = out[f"dec.{j}.block.1.0"] = widths[i - 1]
    for h in HEAD_NAMES:
        out[f"{h}.conv.0"] = head_width
    return out


def _set_double_conv(block: DoubleConv, cin: int, mid: int, cout: int) -> None:
    block.block[0] = conv_bn_relu(cin, mid)
    block.block[1] = conv_bn_relu(mid, cout)


def _set_head(head: Head, cin: int, mid: int) -> None:
    out = nn.Conv2d(mid, head.out.out_channels, 1)
    with torch.no_grad():
        out.bias.copy_(head.out.bias)  # keep the prior the parent set (heatmap p ~ 0.01, size)
    head.conv = conv_bn_relu(cin, mid)
    head.out = out


class SlimCenterNetUNet(CenterNetUNet):
    """:class:`CenterNetUNet` with explicit output widths per convolution (see the module docstring).

    The parent builds the module tree with the per-level widths; every conv whose
    width the arch sets is then replaced, so names, module types and the forward
    pass stay the parent's.
    """

    def __init__(self, in_channels: int, widths, head_width: int, conv_widths: Mapping[str, int]):
        widths = [int(w) for w in widths]
        levels = len(widths)
        if levels < 1:
            raise ValueError("arch 'widths' must name at least one level")
        cw = uniform_conv_widths(widths, int(head_width))
        unknown = sorted(set(conv_widths) - set(cw))
        if unknown:
            raise ValueError(f"arch '{CONV_WIDTHS_KEY}' names unknown conv(s) {', '.join(unknown)}")
        for name, w in conv_widths.items():
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"arch '{CONV_WIDTHS_KEY}' width of {name} must be a positive integer, got {w!r}")
            cw[name] = w
        level_out = [cw[f"enc.{i}.block.1.0"] for i in range(levels)]
        super().__init__(int(in_channels), level_out, int(head_width))
        self.conv_widths = cw
        self.stem = conv_bn_relu(self.in_channels, cw["stem.0"], stride=2)
        cin = cw["stem.0"]
        for i in range(levels):
            _set_double_conv(self.enc[i], cin, cw[f"enc.{i}.block.0.0"], level_out[i])
            cin = level_out[i]
        for j, i in enumerate(range(levels - 1, 0, -1)):
            out = cw[f"dec.{j}.block.1.0"]
            _set_double_conv(self.dec[j], cin + level_out[i - 1], cw[f"dec.{j}.block.0.0"], out)
            cin = out
        for h in HEAD_NAMES:
            _set_head(getattr(self, h), cin, cw[f"{h}.conv.0"])


def conv_widths_of(model: CenterNetUNet) -> Dict[str, int]:
    """Output channels of every prunable conv of ``model`` (a pruned model included)."""
    modules = dict(model.named_modules())
    return {name: int(modules[name].out_channels) for name in conv_names(len(model.enc))}


def arch_of(model: CenterNetUNet) -> dict:
    """The architecture dict that rebuilds ``model`` with :func:`build_from_widths` (JSON-serialisable)."""
    return arch_from_conv_widths(int(model.stem[0].in_channels), len(model.enc), conv_widths_of(model))


def arch_from_conv_widths(in_channels: int, levels: int, conv_widths: Mapping[str, int]) -> dict:
    """The architecture dict of a ``levels``-level model with every conv's output width given."""
    cw = dict(conv_widths)
    return {
        "in_channels": int(in_channels),
        "widths": [cw[f"enc.{i}.block.1.0"] for i in range(levels)],
        "head_width": max(cw[f"{h}.conv.0"] for h in HEAD_NAMES),
        CONV_WIDTHS_KEY: cw,
    }


def build_from_widths(arch: Mapping) -> CenterNetUNet:
    """A model from an arch dict, with or without ``conv_widths`` (ValueError/TypeError if malformed)."""
    widths = [int(w) for w in arch["widths"]]
    conv_widths = arch.get(CONV_WIDTHS_KEY) or {}
    if not isinstance(conv_widths, Mapping):
        raise TypeError(f"arch '{CONV_WIDTHS_KEY}' must be a mapping, got {type(conv_widths).__name__}")
    return SlimCenterNetUNet(int(arch["in_channels"]), widths, int(arch["head_width"]), dict(conv_widths))
