import numpy as np

from edge.decode.peaks import extract_peaks
from edge.decode.spec import DecodeSpec
from toolchain.training.targets import SliceNodule, make_slice_targets


def test_targets_decode_back_to_the_nodule():
    spec = DecodeSpec(stride=2, score_threshold=0.5, min_slices=1)
    t = make_slice_targets([SliceNodule(50.3, 60.7, 10.0, 0.2)], 128, 128, 2)
    peaks = extract_peaks(t.heatmap, t.size, t.offset, spec)
    assert len(peaks) == 1
    assert abs(peaks["row"][0] - 50.3) < 1e-5 and abs(peaks["col"][0] - 60.7) < 1e-5
    assert peaks["diameter"][0] == 10.0


def test_grazing_slice_is_ignored_not_negative():
    t = make_slice_targets([SliceNodule(40, 40, 12.0, 0.9)], 128, 128, 2)
    assert t.heatmap.max() == 0.0
    assert t.weight[20, 20] == 0.0 and t.weight[0, 0] == 1.0
    assert t.reg_mask.sum() == 0


def test_outside_slice_and_outside_crop_give_nothing():
    t = make_slice_targets([SliceNodule(40, 40, 12.0, 1.5), SliceNodule(-30, 40, 8.0, 0.1)], 64, 64, 2)
    assert t.heatmap.max() == 0 and t.weight.min() == 1.0


def test_two_nodules_two_peaks():
    t = make_slice_targets([SliceNodule(20, 20, 8, 0.0), SliceNodule(90, 100, 20, 0.5)], 128, 128, 2)
    assert t.reg_mask.sum() == 2
    assert np.isclose(t.heatmap.max(), 1.0)
