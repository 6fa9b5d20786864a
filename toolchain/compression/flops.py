"""Parameter and multiply-accumulate (MAC) counts of a network for one input.

MACs count the convolutions and linear layers, the work that matters on the
device: BatchNorm folds into the preceding conv at export, and ReLU, pooling,
upsampling and concatenation do no multiply-accumulates.
"""

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    macs: int  # per input of the measured shape (batch 1)

    def ratio_to(self, reference: "ModelCost") -> "CostRatio":
        return CostRatio(self.parameters / reference.parameters, self.macs / reference.macs)


@dataclass(frozen=True)
class CostRatio:
    parameters: float
    macs: float


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return output[0].numel() * per_output


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output[0].numel() * module.in_features


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass on a zero input of ``(C, H, W)`` (batch 1); the model's mode is restored."""
    total = [0]

    def hook(module, _inputs, output):
        if isinstance(module, nn.Conv2d):
            total[0] += _conv_macs(module, output)
        else:
            total[0] += _linear_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]


def model_cost(model: nn.Module, input_shape: Sequence[int]) -> ModelCost:
    return ModelCost(count_parameters(model), count_macs(model, input_shape))
