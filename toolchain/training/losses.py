"""CenterNet losses: penalty-reduced focal loss on the heatmap, L1 on size and offset."""

import torch
import torch.nn.functional as F


def focal_loss(logits, target, weight, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet focal loss, normalised by the number of positives; ``weight`` 0 ignores a cell."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0).float()
    neg = (1.0 - pos) * weight
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    pos_loss = -(pos * (1 - p) ** alpha * logp).sum()
    neg_loss = -(neg * (1 - target) ** beta * p ** alpha * log1mp).sum()
    n = pos.sum().clamp(min=1.0)
    return (pos_loss + neg_loss) / n


def reg_l1(pred, target, mask):
    """Mean L1 over the cells in ``mask`` (broadcast over channels)."""
    m = mask.expand_as(pred)
    return (torch.abs(pred - target) * m).sum() / m.sum().clamp(min=1.0)


def detection_loss(outputs, targets, size_weight: float = 0.1, offset_weight: float = 1.0):
    hm, size, off = outputs
    t_hm, t_size, t_off, reg, wt = targets
    l_hm = focal_loss(hm, t_hm, wt)
    l_size = reg_l1(size, t_size, reg)
    l_off = reg_l1(off, t_off, reg)
    total = l_hm + size_weight * l_size + offset_weight * l_off
    return total, {"heatmap": l_hm.item(), "size": l_size.item(), "offset": l_off.item()}
