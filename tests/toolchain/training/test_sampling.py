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
