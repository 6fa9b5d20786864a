import torch

from toolchain.training.losses import focal_loss, reg_l1


def test_focal_loss_prefers_correct_heatmap_and_ignores_masked_cells():
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 3] = 1.0
    weight = torch.ones_like(target)
    good = torch.full_like(target, -6.0)
    good[0, 0, 3, 3] = 6.0
    bad = -good
    assert focal_loss(good, target, weight) < focal_loss(bad, target, weight)
    # a confident false positive in an ignored cell costs nothing
    fp = good.clone()
    fp[0, 0, 6, 6] = 6.0
    weight[0, 0, 6, 6] = 0.0
    assert torch.isclose(focal_loss(fp, target, weight), focal_loss(good, target, weight))


def test_reg_l1_only_counts_masked_cells():
    pred = torch.zeros(1, 2, 4, 4)
    tgt = torch.ones(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1, 1] = 1
    assert float(reg_l1(pred, tgt, mask)) == 1.0
    pred[0, :, 1, 1] = 1.0
    assert float(reg_l1(pred, tgt, mask)) == 0.0
