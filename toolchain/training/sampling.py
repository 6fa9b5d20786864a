"""Training crops with augmentation (rotation, scale, flip, noise, gamma, blur, contrast).

Geometry is augmented by one affine warp per crop, and the nodule centres go
through the same affine, so targets stay exact. Intensity augmentation works
on the unit-range windowed planes (it stands for scanner calibration, dose and
reconstruction-kernel differences).

Positive crops are centred on a nodule core. ``positive_sampling="slice"`` draws
a slice that shows a core (then one of its cores), so a 20 mm nodule seen on a
dozen slices is drawn a dozen times as often as a 4 mm one seen on one;
``"nodule"`` draws a nodule first and then one of its core slices, so small
nodules are seen as often as large ones; ``"small"`` draws a nodule with a
probability inversely proportional to its diameter (a 4 mm nodule five times as
often as a 20 mm one), for models that fall behind on small nodules.

Negative crops are centred anywhere in the middle of a random slice, or, for a
``hard_negative_fraction`` of them, on a hard negative: a place where a model
scored high away from every nodule (:mod:`toolchain.training.hard_negatives`).
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import cv2
import numpy as np

from toolchain.training.slice_cache import CachedSeries
from toolchain.training.targets import CORE_FRACTION, SliceNodule, make_slice_targets


POSITIVE_SAMPLING_MODES = ("slice", "nodule", "small")
POSITIVE_SAMPLING_HELP = ("positive crops: every nodule core slice equally (slice, default), every nodule equally, "
                          "so small nodules are seen as often as large ones (nodule), or nodules in inverse "
                          "proportion to their diameter (small)")


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 128
    positive_fraction: float = 0.5
    positive_sampling: str = "slice"  # "slice", "nodule" or "small" (see the module docstring)
    hard_negative_fraction: float = 0.0  # of the negative crops, when the sampler is given hard negatives
    rotate_deg: float = 180.0
    scale_range: Tuple[float, float] = (0.8, 1.25)
    noise_sigma_max: float = 0.06
    noise_grain_probability: float = 0.5  # band-limited (correlated) noise, as from smooth kernels
    sharpen_probability: float = 0.3  # edge enhancement, as from sharp (e.g. Br64, FC52) kernels
    sharpen_max: float = 1.0
    gamma_range: Tuple[float, float] = (0.75, 1.35)
    blur_probability: float = 0.3
    blur_sigma_max: float = 0.9
    contrast_range: Tuple[float, float] = (0.9, 1.1)
    brightness_max: float = 0.03


class CropSampler:
    """Draws (input, targets) training crops from cached series."""

    def __init__(self, series: Sequence[CachedSeries], slices: int, stride: int, fill_value: float, cfg: AugmentConfig,
                 hard_negatives: Sequence[Tuple[int, int, float, float]] = ()):
        """``hard_negatives``: (series index, slice index, row, col) in model-input pixels
        (:func:`toolchain.training.hard_negatives.index_hard_negatives`)."""
        self.series = list(series)
        self.slices = slices
        self.stride = stride
        self.fill = fill_value
        self.cfg = cfg
        if cfg.positive_sampling not in POSITIVE_SAMPLING_MODES:
            raise ValueError(f"positive_sampling must be one of {POSITIVE_SAMPLING_MODES}, not {cfg.positive_sampling!r}")
        # a positive is drawn as a group of (series, slice, entry) core views, then one view of the group:
        # "slice" groups the cores on one slice, "nodule" and "small" the slices of one nodule
        by_nodule = cfg.positive_sampling in ("nodule", "small")
        self.positives = self._nodule_cores() if by_nodule else self._slice_cores()
        self.positive_weights = None  # None: groups drawn uniformly
        if cfg.positive_sampling == "small" and self.positives:
            inverse = np.array([1.0 / max(self._diameter(g[0]), 1e-3) for g in self.positives])
            self.positive_weights = inverse / inverse.sum()
        if not 0.0 <= cfg.hard_negative_fraction <= 1.0:
            raise ValueError(f"hard_negative_fraction must be in [0, 1], not {cfg.hard_negative_fraction}")
        self.hard_negatives = list(hard_negatives)
        for si, k, _r, _c in self.hard_negatives:
            if not (0 <= si < len(self.series) and 0 <= k < len(self.series[si].planes)):
                raise ValueError(f"hard negative on series {si}, slice {k}: no such cached slice")

    def _slice_cores(self) -> List[List[Tuple[int, int, int]]]:
        groups = ([(si, k, e) for e, n in enumerate(ns) if n[3] <= CORE_FRACTION]
                  for si, s in enumerate(self.series) for k, ns in enumerate(s.nodules))
        return [g for g in groups if g]

    def _nodule_cores(self) -> List[List[Tuple[int, int, int]]]:
        cores = defaultdict(list)
        for si, s in enumerate(self.series):
            if s.nodule_ids is None:
                raise ValueError(f"series {s.series_uid}: nodule_ids are needed for positive_sampling="
                                 f"{self.cfg.positive_sampling!r}")
            for k, (ns, ids) in enumerate(zip(s.nodules, s.nodule_ids)):
                for e, (n, nid) in enumerate(zip(ns, ids)):
                    if n[3] <= CORE_FRACTION:
                        cores[(si, nid)].append((si, k, e))
        return [cores[key] for key in sorted(cores)]

    def _diameter(self, view: Tuple[int, int, int]) -> float:
        si, k, e = view
        return float(self.series[si].nodules[k][e][2])

    def draw_positive_group(self, rng: np.random.Generator) -> List[Tuple[int, int, int]]:
        """One group of core views, uniformly or by :attr:`positive_weights`."""
        if self.positive_weights is None:
            return self.positives[rng.integers(len(self.positives))]
        return self.positives[rng.choice(len(self.positives), p=self.positive_weights)]

    def sample(self, rng: np.random.Generator):
        cfg = self.cfg
        if self.positives and rng.random() < cfg.positive_fraction:
            views = self.draw_positive_group(rng)
            si, k, e = views[rng.integers(len(views))]
            n = self.series[si].nodules[k][e]
            jitter = rng.uniform(-0.35, 0.35, 2) * cfg.crop
            centre = (n[0] + jitter[0], n[1] + jitter[1])
        elif self.hard_negatives and rng.random() < cfg.hard_negative_fraction:
            si, k, row, col = self.hard_negatives[rng.integers(len(self.hard_negatives))]
            jitter = rng.uniform(-0.35, 0.35, 2) * cfg.crop
            centre = (row + jitter[0], col + jitter[1])
        else:
            si = int(rng.integers(len(self.series)))
            k = int(rng.integers(len(self.series[si].planes)))
            h, w = self.series[si].planes.shape[-2:]
            centre = (rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w)
        return self._crop(self.series[si], k, centre, rng)

    def _crop(self, s: CachedSeries, k: int, centre, rng):
        cfg, S = self.cfg, self.cfg.crop
        half = self.slices // 2
        idx = [min(max(k + d, 0), len(s.planes) - 1) for d in range(-half, half + 1)]
        if rng.random() < 0.5:  # slice order along z is arbitrary between scanners
            idx = idx[::-1]
        stack = s.planes[idx].reshape(-1, *s.planes.shape[-2:]).astype(np.float32)

        angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
        zoom = float(np.exp(rng.uniform(*np.log(cfg.scale_range))))
        flip = rng.random() < 0.5
        # src (x=col, y=row) -> dst: dst = zoom * R * F * (src - centre) + (S - 1) / 2
        a = np.deg2rad(angle)
        R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * zoom
        if flip:
            R = R @ np.diag([-1.0, 1.0])
        c = np.array([centre[1], centre[0]])
        t = (S - 1) / 2.0 - R @ c
        M = np.hstack([R, t[:, None]]).astype(np.float64)
        out = np.empty((stack.shape[0], S, S), np.float32)
        for ch in range(stack.shape[0]):
            out[ch] = cv2.warpAffine(stack[ch], M, (S, S), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=float(self.fill))

        nods: List[SliceNodule] = []
        for (r, col, d, frac) in s.nodules[k]:
            x, y = R @ np.array([col, r]) + t
            nods.append(SliceNodule(float(y), float(x), d * zoom, frac))
        tg = make_slice_targets(nods, S, S, self.stride)

        # intensity
        out = np.clip(out, 0.0, 1.0)
        g = rng.uniform(*cfg.gamma_range)
        out = out ** g
        if rng.random() < cfg.blur_probability:
            sig = rng.uniform(0.3, cfg.blur_sigma_max)
            for ch in range(out.shape[0]):
                out[ch] = cv2.GaussianBlur(out[ch], (0, 0), sig)
        elif rng.random() < cfg.sharpen_probability:
            amount = rng.uniform(0.2, cfg.sharpen_max)
            for ch in range(out.shape[0]):
                out[ch] += np.float32(amount) * (out[ch] - cv2.GaussianBlur(out[ch], (0, 0), 1.0))
        out = out * rng.uniform(*cfg.contrast_range) + rng.uniform(-cfg.brightness_max, cfg.brightness_max)
        out += self._noise(out.shape, rng)
        return out.astype(np.float32), tg

    def _noise(self, shape, rng) -> np.ndarray:
        """White or correlated Gaussian noise with a random SD up to ``noise_sigma_max``."""
        cfg = self.cfg
        noise = rng.standard_normal(shape).astype(np.float32)
        if rng.random() < cfg.noise_grain_probability:
            grain = rng.uniform(0.5, 1.5)
            for ch in range(shape[0]):
                noise[ch] = cv2.GaussianBlur(noise[ch], (0, 0), grain)
            noise /= max(float(noise.std()), 1e-6)
        return noise * np.float32(rng.uniform(0, cfg.noise_sigma_max))


def collate(samples):
    x = np.stack([s[0] for s in samples])
    t = samples
    hm = np.stack([s[1].heatmap for s in t])[:, None]
    size = np.stack([s[1].size for s in t])[:, None]
    off = np.stack([s[1].offset for s in t])
    reg = np.stack([s[1].reg_mask for s in t])[:, None]
    wt = np.stack([s[1].weight for s in t])[:, None]
    return x, hm, size, off, reg, wt
