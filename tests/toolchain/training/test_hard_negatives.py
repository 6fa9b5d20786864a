import numpy as np
import pytest
import torch

from edge.errors import ConfigError, InputError
from toolchain.training.hard_negatives import (HardNegative, check_hard_negative_settings, index_hard_negatives,
                                               mine_hard_negatives, near_a_nodule, read_hard_negatives,
                                               series_peaks, slice_stack, write_hard_negatives)
from toolchain.training.sampling import AugmentConfig, CropSampler
from toolchain.training.slice_cache import CachedSeries

STRIDE = 2


def series(uid="1.2.9", n=6, size=64, nodule_slice=2):
    """Flat planes; one 6-px nodule at (20, 20) annotated on ``nodule_slice`` only."""
    planes = np.full((n, 1, size, size), 0.1, np.float16)
    nodules = [[] for _ in range(n)]
    nodules[nodule_slice].append((20.0, 20.0, 6.0, 0.0))
    return CachedSeries(uid, planes, np.arange(n) * 2.0, 2.0, nodules)


class PeakNet(torch.nn.Module):
    """A stand-in detector: heatmap peaks where a slice's centre plane is bright, logit +3 there, -6 elsewhere."""

    def forward(self, x):
        centre = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        cells = torch.nn.functional.avg_pool2d(centre, STRIDE)
        hm = torch.where(cells > 0.5, torch.tensor(3.0), torch.tensor(-6.0)) + cells  # the brightest cell wins
        n, _, h, w = hm.shape
        return hm, torch.ones(n, 1, h, w), torch.zeros(n, 2, h, w)


def test_series_peaks_keeps_local_maxima_above_the_score_in_model_input_pixels():
    hm = np.zeros((16, 16), np.float32)
    hm[3, 5], hm[10, 12], hm[10, 13] = 0.9, 0.4, 0.2  # (10, 13) is not a local maximum
    off = np.zeros((2, 16, 16), np.float32)
    off[:, 3, 5] = (0.25, -0.25)
    peaks = series_peaks(hm, off, STRIDE, min_score=0.3)
    assert [round(p[0], 2) for p in peaks] == [0.9, 0.4]
    assert peaks[0][1:] == pytest.approx(((3 + 0.25) * 2 + 0.5, (5 - 0.25) * 2 + 0.5))
    assert series_peaks(hm, off, STRIDE, min_score=0.95) == []


def test_near_a_nodule_reaches_two_slices_and_one_diameter_plus_a_margin():
    s = series()
    assert near_a_nodule(s, 2, 20.0, 20.0) and near_a_nodule(s, 4, 26.0, 20.0)
    assert not near_a_nodule(s, 5, 20.0, 20.0)  # three slices away
    assert not near_a_nodule(s, 2, 20.0, 35.0)  # 15 px from a 6-px nodule


def test_mining_keeps_peaks_away_from_nodules_best_first_capped_per_series():
    s = series()
    s.planes[0:5, :, 19:23, 19:23] = 1.0  # the nodule, within reach of its annotated slice 2: never a negative
    s.planes[1, :, 40:42, 50:52] = 0.9  # a look-alike on slice 1: output cell (20, 25)
    s.planes[4, :, 10:12, 50:52] = 1.0  # a brighter one on slice 4: cell (5, 25)
    found = mine_hard_negatives(PeakNet(), [s], slices=3, stride=STRIDE, min_score=0.5, max_per_series=5)
    # each look-alike is seen through the centre plane of its own slice only; cell centres are i * 2 + 0.5
    assert [(h.slice_index, h.row, h.col) for h in found] == [(4, 10.5, 50.5), (1, 40.5, 50.5)]
    assert found[0].score > found[1].score and all(h.series_uid == "1.2.9" for h in found)
    capped = mine_hard_negatives(PeakNet(), [s], slices=3, stride=STRIDE, min_score=0.5, max_per_series=1)
    assert [h.slice_index for h in capped] == [4]
    with pytest.raises(ValueError):
        mine_hard_negatives(PeakNet(), [s], slices=3, stride=STRIDE, min_score=1.5)


def test_slice_stack_repeats_the_edge_slices():
    s = series(n=3)
    for k in range(3):
        s.planes[k] = k
    assert slice_stack(s, 0, 3)[:, 0, 0].tolist() == [0, 0, 1]
    assert slice_stack(s, 2, 3)[:, 0, 0].tolist() == [1, 2, 2]


def test_csv_round_trip_and_bad_files_name_the_file(tmp_path):
    rows = [HardNegative("1.2.9", 4, 12.5, 52.25, 0.91), HardNegative("1.2.8", 0, 1.0, 2.0, 0.3)]
    path = tmp_path / "sub" / "hard.csv"
    write_hard_negatives(path, rows)
    assert read_hard_negatives(path) == rows
    bad = tmp_path / "bad.csv"
    bad.write_text("series_uid,slice_index,row,col,score\n1.2.9,four,1,2,0.5\n")
    with pytest.raises(InputError, match="line 2") as e:
        read_hard_negatives(bad)
    assert "bad.csv" in str(e.value)
    bad.write_text("series_uid,row,col\n")
    with pytest.raises(InputError, match="missing column"):
        read_hard_negatives(bad)
    with pytest.raises(InputError, match="cannot read"):
        read_hard_negatives(tmp_path / "absent.csv")


def test_index_skips_other_series_and_refuses_slices_past_the_end():
    a, b = series("1.2.9"), series("1.2.7")
    rows = [HardNegative("1.2.7", 3, 5.0, 6.0, 0.8), HardNegative("9.9", 0, 1.0, 1.0, 0.9)]
    assert index_hard_negatives(rows, [a, b]) == [(1, 3, 5.0, 6.0)]
    with pytest.raises(InputError, match="slice 6"):
        index_hard_negatives([HardNegative("1.2.9", 6, 1.0, 1.0, 0.5)], [a], "hard.csv")


def test_settings_are_checked():
    check_hard_negative_settings(True, 0.5)
    check_hard_negative_settings(False, 0.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        check_hard_negative_settings(True, 1.5)
    with pytest.raises(ConfigError, match="needs hard negatives"):
        check_hard_negative_settings(False, 0.5)


def share_of_crops_showing(fraction: float, draws: int = 200) -> float:
    """Negative crops of a 512-px plane that show a bright 8-px mark at a hard negative at (400, 100)."""
    planes = np.zeros((3, 1, 512, 512), np.float16)
    planes[:, :, 396:404, 96:104] = 1.0
    s = CachedSeries("1.2.9", planes, np.arange(3) * 2.0, 2.0, [[] for _ in range(3)])
    cfg = AugmentConfig(crop=64, positive_fraction=0.0, hard_negative_fraction=fraction, noise_sigma_max=0.0,
                        gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0), brightness_max=0.0, blur_probability=0.0,
                        sharpen_probability=0.0, scale_range=(1.0, 1.0))
    sampler = CropSampler([s], slices=3, stride=STRIDE, fill_value=0.0, cfg=cfg, hard_negatives=[(0, 1, 400.0, 100.0)])
    rng = np.random.default_rng(0)
    return float(np.mean([sampler.sample(rng)[0].max() > 0.5 for _ in range(draws)]))


def test_negative_crops_centre_on_hard_negatives_in_the_configured_share():
    assert share_of_crops_showing(1.0) > 0.9
    assert share_of_crops_showing(0.0) < 0.1
    assert 0.3 < share_of_crops_showing(0.5) < 0.7


def test_sampler_refuses_hard_negatives_off_its_series():
    with pytest.raises(ValueError, match="no such cached slice"):
        CropSampler([series()], slices=3, stride=STRIDE, fill_value=0.0, cfg=AugmentConfig(),
                    hard_negatives=[(0, 9, 1.0, 1.0)])
