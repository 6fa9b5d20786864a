"""Function-preserving widening of a (pruned) detector: channels back where pruning cut too deep.

Global channel pruning ranks filters across the whole network, so it can leave
a level far narrower than its share of the cost suggests (the released
student kept 8 of the teacher's 32 channels at stride 2, where small nodules
are resolved, and 18% of its MACs against a 30% budget). :func:`widen` gives
chosen convolutions more output channels without changing what the network
computes: each new channel gets freshly initialised incoming weights, a
neutral BatchNorm, and *zero* weights in every convolution that reads it
(Net2WiderNet with a zero fan-out, Chen et al., 2016). Training then grows the
new channels from the narrow network's function instead of from scratch.
"""

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from edge.errors import ConfigError
from toolchain.compression.arch import HEAD_NAMES, arch_from_conv_widths, build_from_widths, conv_widths_of
from toolchain.models.centernet_unet import CenterNetUNet

NETWORK_INPUT = None  # the source of the stem: the image, whose channels never change


def conv_input_sources(levels: int) -> Dict[str, List[Optional[str]]]:
    """For every conv of a ``levels``-level detector: the convs whose outputs it reads, in channel order.

    Decoder convs read a concatenation (upsampled path, then the skip); the
    heads' final 1x1 convs (``heatmap.out``...) read their head's 3x3 conv.
    """
    src: Dict[str, List[Optional[str]]] = {"stem.0": [NETWORK_INPUT]}
    prev = "stem.0"
    for i in range(levels):
        src[f"enc.{i}.block.0.0"] = [prev]
        src[f"enc.{i}.block.1.0"] = [f"enc.{i}.block.0.0"]
        prev = f"enc.{i}.block.1.0"
    for j, i in enumerate(range(levels - 1, 0, -1)):
        src[f"dec.{j}.block.0.0"] = [prev, f"enc.{i - 1}.block.1.0"]
        src[f"dec.{j}.block.1.0"] = [f"dec.{j}.block.0.0"]
        prev = f"dec.{j}.block.1.0"
    for h in HEAD_NAMES:
        src[f"{h}.conv.0"] = [prev]
        src[f"{h}.out"] = [f"{h}.conv.0"]
    return src


def check_widths(model: CenterNetUNet, widths: Mapping[str, int]) -> Dict[str, int]:
    """The model's conv widths with ``widths`` applied; ConfigError for an unknown conv or a narrower width."""
    current = conv_widths_of(model)
    unknown = sorted(set(widths) - set(current))
    if unknown:
        raise ConfigError(f"unknown conv(s) {', '.join(unknown)}; widenable: {', '.join(current)}")
    for name, w in widths.items():
        if isinstance(w, bool) or not isinstance(w, int) or w < current[name]:
            raise ConfigError(f"{name} has {current[name]} channels; a widened width must be an integer "
                              f">= that, got {w!r}")
    return dict(current, **widths)


def _copy_conv(old: nn.Conv2d, new: nn.Conv2d, in_map: List[int], new_inputs: List[int]) -> None:
    """Old weights into ``new`` (old input channel k -> ``in_map[k]``); zero weights from new input channels."""
    w = new.weight
    w[:, new_inputs] = 0.0
    w[: old.out_channels, in_map] = old.weight
    if old.bias is not None:
        new.bias[: old.out_channels] = old.bias


def _copy_batchnorm(old: nn.BatchNorm2d, new: nn.BatchNorm2d) -> None:
    n = old.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name)[:n] = getattr(old, name)
    new.num_batches_tracked.copy_(old.num_batches_tracked)


def widen(model: CenterNetUNet, widths: Mapping[str, int], seed: int = 0) -> CenterNetUNet:
    """A copy of ``model`` with the convs in ``widths`` ({conv name: output channels}) widened; same outputs.

    New channels' incoming weights are initialised as PyTorch initialises a
    conv (seeded by ``seed``); their BatchNorm starts neutral; their outgoing
    weights are zero. The result is in the mode ``model`` was in.
    """
    new_widths = check_widths(model, widths)
    old_widths = conv_widths_of(model)
    in_channels = int(model.stem[0].in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = build_from_widths(arch_from_conv_widths(in_channels, len(model.enc), new_widths))
    old_modules, new_modules = dict(model.named_modules()), dict(wide.named_modules())
    with torch.no_grad():
        for name, sources in conv_input_sources(len(model.enc)).items():
            in_map: List[int] = []
            new_inputs: List[int] = []
            offset = 0
            for src in sources:
                n_old = in_channels if src is NETWORK_INPUT else old_widths[src]
                n_new = in_channels if src is NETWORK_INPUT else new_widths[src]
                in_map += range(offset, offset + n_old)
                new_inputs += range(offset + n_old, offset + n_new)
                offset += n_new
            _copy_conv(old_modules[name], new_modules[name], in_map, new_inputs)
            if name in old_widths:  # a conv_bn_relu: its BatchNorm follows as ".1"
                bn = name[: -len(".0")] + ".1"
                _copy_batchnorm(old_modules[bn], new_modules[bn])
    return wide.train(model.training)


def parse_width_settings(items) -> Dict[str, int]:
    """``["stem.0=16", "heatmap.conv.0=32"]`` -> ``{"stem.0": 16, ...}``; ConfigError for a malformed item."""
    out: Dict[str, int] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        try:
            width = int(value)
        except ValueError:
            width = None
        if not sep or not name or width is None:
            raise ConfigError(f"width setting {item!r} is not NAME=CHANNELS (e.g. stem.0=16)")
        if name in out:
            raise ConfigError(f"width of {name} given twice")
        out[name] = width
    return out


def level_convs(levels: int, level: int) -> List[str]:
    """The convs whose outputs are at resolution ``level`` (0: stride 2): stem (level 0), encoder and decoder."""
    if not isinstance(level, int) or not 0 <= level < levels:
        raise ConfigError(f"level must be 0..{levels - 1} for this {levels}-level model, got {level!r}")
    names = ["stem.0"] if level == 0 else []
    names += [f"enc.{level}.block.0.0", f"enc.{level}.block.1.0"]
    if level < levels - 1:
        j = levels - 2 - level  # dec[j] upsamples to level ``level``
        names += [f"dec.{j}.block.0.0", f"dec.{j}.block.1.0"]
    return names


def resolve_width_settings(levels: int, level_items=(), heads: Optional[int] = None, conv_items=()) -> Dict[str, int]:
    """{conv name: channels} from ``K=W`` level items (every conv at level K), a heads width and ``NAME=W`` items.

    ConfigError for a malformed item, a level the model lacks, or a conv set twice (overlapping settings).
    """
    pairs = []
    for level, width in parse_width_settings(level_items).items():
        try:
            k = int(level)
        except ValueError:
            raise ConfigError(f"a level width takes K=W with an integer level K, got {level!r}") from None
        pairs += [(name, width) for name in level_convs(levels, k)]
    if heads is not None:
        pairs += [(f"{h}.conv.0", heads) for h in HEAD_NAMES]
    pairs += list(parse_width_settings(conv_items).items())
    widths: Dict[str, int] = {}
    for name, width in pairs:
        if name in widths:
            raise ConfigError(f"the width of {name} is set twice (the level, heads and conv settings overlap)")
        widths[name] = width
    return widths


def widen_checkpoint(checkpoint_path, out_path, widths: Mapping[str, int], seed: int = 0):
    """:func:`widen` from and to checkpoint files; the card records the source and the widths. Returns the model."""
    from toolchain.compression.checkpoint import save_checkpoint
    from toolchain.export.onnx_export import load_checkpoint

    model, specs = load_checkpoint(checkpoint_path)
    wide = widen(model, widths, seed=seed)
    card = dict(specs.card, widened_from=str(checkpoint_path), widened={k: int(v) for k, v in sorted(widths.items())})
    save_checkpoint(out_path, wide, specs, card)
    return wide
