import numpy as np
import pytest

from toolchain.training.sampling import AugmentConfig, CropSampler
from toolchain.training.slice_cache import CachedSeries


def flat_series():
    planes = np.full((5, 1, 96, 96), 0.5, np.float16)
    planes[:, :, 40:56, 40:56] = 0.9  # one edge to enhance
    return CachedSeries("1.2.3", planes, np.arange(5) * 2.0, 2.0, [[] for _ in range(5)])


def sampler(**aug):
    cfg = AugmentConfig(crop=64, rotate_deg=0.0, scale_range=(1.0, 1.0), gamma_range=(1.0, 1.0),
                        contrast_range=(1.0, 1.0), brightness_max=0.0, blur_probability=0.0, **aug)
    return CropSampler([flat_series()], slices=3, stride=2, fill_value=0.0, cfg=cfg)


@pytest.mark.parametrize("grain", [0.0, 1.0])
def test_noise_sd_is_bounded_by_the_configured_maximum(grain):
    s = sampler(noise_sigma_max=0.05, noise_grain_probability=grain, sharpen_probability=0.0)
    sds = []
    for seed in range(20):
        noise = s._noise((3, 64, 64), np.random.default_rng(seed))
        sds.append(noise.std())
    assert max(sds) <= 0.05 * 1.1 and max(sds) > 0.02


def test_correlated_noise_is_smoother_than_white_noise():
    def neighbour_correlation(grain):
        n = sampler(noise_sigma_max=0.05, noise_grain_probability=grain)._noise((1, 64, 64), np.random.default_rng(1))
        return np.corrcoef(n[0, :, :-1].ravel(), n[0, :, 1:].ravel())[0, 1]

    assert abs(neighbour_correlation(0.0)) < 0.1
    assert neighbour_correlation(1.0) > 0.3


def test_sharpening_overshoots_at_edges_and_keeps_flat_areas():
    plain = sampler(noise_sigma_max=0.0, sharpen_probability=0.0)
    sharp = sampler(noise_sigma_max=0.0, sharpen_probability=1.0)
    a = plain._crop(plain.series[0], 2, (48.0, 48.0), np.random.default_rng(4))[0]
    b = sharp._crop(sharp.series[0], 2, (48.0, 48.0), np.random.default_rng(4))[0]
    assert b.max() > a.max() + 0.02  # overshoot on the bright side of the edge
    assert np.allclose(a[:, 32, 2:8], b[:, 32, 2:8], atol=1e-4)  # far from the edge: unchanged


def two_nodule_series(with_ids: bool = True) -> CachedSeries:
    """A 9-slice series: a large nodule cored on every slice, a small one (id 1) on slice 4 only."""
    planes = np.full((9, 1, 96, 96), 0.2, np.float16)
    nodules = [[(30.0, 30.0, 20.0, 0.1)] for _ in range(9)]
    ids = [[0] for _ in range(9)]
    nodules[4].append((70.0, 70.0, 3.0, 0.2))
    ids[4].append(1)
    return CachedSeries("1.2.4", planes, np.arange(9) * 2.0, 2.0, nodules, ids if with_ids else None)


def sampler_of(series: CachedSeries, **cfg) -> CropSampler:
    return CropSampler([series], slices=3, stride=2, fill_value=0.0, cfg=AugmentConfig(crop=64, **cfg))


def small_nodule_share(mode: str, draws: int = 2000) -> float:
    s = sampler_of(two_nodule_series(), positive_sampling=mode)
    rng = np.random.default_rng(0)
    small = 0
    for _ in range(draws):
        views = s.draw_positive_group(rng)
        si, k, e = views[rng.integers(len(views))]
        small += s.series[si].nodules[k][e][2] < 10
    return small / draws


def test_nodule_sampling_draws_a_small_nodule_as_often_as_a_large_one():
    # slice mode: 10 core views, 1 of them small (drawn via slice 4 half the time: 1/9 * 1/2)
    assert abs(small_nodule_share("slice") - 1 / 18) < 0.02
    assert abs(small_nodule_share("nodule") - 0.5) < 0.04


def test_small_sampling_draws_nodules_in_inverse_proportion_to_their_diameter():
    s = sampler_of(two_nodule_series(), positive_sampling="small")
    assert s.positives == sampler_of(two_nodule_series(), positive_sampling="nodule").positives
    assert s.positive_weights.tolist() == pytest.approx([3 / 23, 20 / 23])  # diameters 20 and 3 px
    assert abs(small_nodule_share("small") - 20 / 23) < 0.03
    x, targets = sampler_of(two_nodule_series(), positive_sampling="small",
                            positive_fraction=1.0).sample(np.random.default_rng(0))
    assert x.shape == (3, 64, 64) and targets.heatmap.max() == 1.0


def test_slice_sampling_groups_the_cores_of_one_slice():
    s = sampler_of(two_nodule_series())
    assert len(s.positives) == 9 and s.positives[4] == [(0, 4, 0), (0, 4, 1)]


def test_nodule_sampling_groups_the_slices_of_one_nodule_and_skips_grazing_slices():
    series = two_nodule_series()
    series.nodules[0][0] = (30.0, 30.0, 20.0, 0.9)  # the slice only grazes the large nodule
    s = sampler_of(series, positive_sampling="nodule")
    assert s.positives == [[(0, k, 0) for k in range(1, 9)], [(0, 4, 1)]]


def test_nodule_sampling_needs_nodule_ids_and_a_known_mode():
    with pytest.raises(ValueError, match="nodule_ids"):
        sampler_of(two_nodule_series(with_ids=False), positive_sampling="nodule")
    with pytest.raises(ValueError, match="positive_sampling"):
        sampler_of(two_nodule_series(), positive_sampling="lesion")
