"""Scanner profiles and the imaging chain: kernel blur, noise, storage.

A :class:`ScannerProfile` names a (fictional) scanner and reconstruction
protocol: the ranges its series are drawn from and how it stores pixels.
:meth:`ScannerProfile.realise` draws one series' :class:`Acquisition` from
those ranges; the functions below turn a noiseless HU slice into the stored
integers that scanner would write.

Pixel spacing ranges refer to a 512-pixel matrix: the reconstruction field of
view is ``512 * spacing``, and a smaller test matrix covers the same field of
view with proportionally larger pixels.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from edge.errors import ConfigError

REFERENCE_MATRIX = 512


@dataclass(frozen=True)
class ScannerProfile:
    """One scanner and reconstruction protocol."""

    name: str
    manufacturer: str
    model: str
    kernel: str  # ConvolutionKernel
    kvp: float
    pixel_spacing_mm: Tuple[float, float]  # (min, max) at a 512 matrix
    slice_thickness_mm: Tuple[float, ...]  # choices
    spacing_ratio: Tuple[float, ...]  # slice spacing = thickness * ratio; < 1 overlaps
    noise_hu: Tuple[float, float]  # (min, max) noise SD in soft tissue
    noise_grain_mm: float  # correlation length of the noise texture
    blur_mm: float  # Gaussian sigma of the reconstruction kernel
    sharpen: float  # edge enhancement of sharp kernels (0 = none)
    rescale_intercept: float  # -1024 or -1000
    signed: bool  # PixelRepresentation 1 (int16) or 0 (uint16)
    bits_stored: int = 16
    padding_value: Optional[int] = None  # stored value outside the field of view; None: no padding tag
    fov_fraction: float = 1.0  # diameter of the reconstructed circle / image width
    head_first: bool = True  # instance 1 is the most superior slice
    tube_current_ma: Tuple[float, float] = (150.0, 350.0)
    contrast_probability: float = 0.0
    window: Tuple[float, float] = (-600.0, 1500.0)  # WindowCenter, WindowWidth tags
    write_spacing_between_slices: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        lo, hi = self.pixel_spacing_mm
        if not (0.2 <= lo <= hi <= 2.0):
            raise ConfigError(f"profile {self.name}: pixel_spacing_mm must be 0.2 <= min <= max <= 2, got {self.pixel_spacing_mm}")
        if not self.slice_thickness_mm or any(not (0.3 <= t <= 10.0) for t in self.slice_thickness_mm):
            raise ConfigError(f"profile {self.name}: slice_thickness_mm choices must be in 0.3..10, got {self.slice_thickness_mm}")
        if not self.spacing_ratio or any(not (0.25 <= r <= 2.0) for r in self.spacing_ratio):
            raise ConfigError(f"profile {self.name}: spacing_ratio choices must be in 0.25..2, got {self.spacing_ratio}")
        if self.rescale_intercept not in (-1024.0, -1000.0):
            raise ConfigError(f"profile {self.name}: rescale_intercept must be -1024 or -1000, got {self.rescale_intercept}")
        if self.bits_stored not in (12, 16):
            raise ConfigError(f"profile {self.name}: bits_stored must be 12 or 16, got {self.bits_stored}")
        if self.padding_value is not None:
            lo_s, hi_s = storage_range(self.signed, self.bits_stored)
            if not lo_s <= self.padding_value <= hi_s:
                raise ConfigError(f"profile {self.name}: padding_value {self.padding_value} outside storage range {lo_s}..{hi_s}")
            if self.padding_value * 1.0 + self.rescale_intercept > -1025 and self.padding_value != lo_s:
                raise ConfigError(f"profile {self.name}: padding_value {self.padding_value} is a possible tissue value")
        if not (0.5 <= self.fov_fraction <= 1.5):
            raise ConfigError(f"profile {self.name}: fov_fraction must be in 0.5..1.5, got {self.fov_fraction}")

    def realise(self, rng: np.random.Generator, size: int = REFERENCE_MATRIX) -> "Acquisition":
        """Draw one series' acquisition settings from this profile."""
        ps = rng.uniform(*self.pixel_spacing_mm) * REFERENCE_MATRIX / size
        ps = round(ps, 6)
        thick = float(rng.choice(self.slice_thickness_mm))
        ratio = float(rng.choice(self.spacing_ratio))
        return Acquisition(
            profile=self,
            pixel_spacing=ps,
            slice_thickness=thick,
            slice_spacing=round(thick * ratio, 4),
            noise_hu=float(rng.uniform(*self.noise_hu)),
            tube_current_ma=float(round(rng.uniform(*self.tube_current_ma))),
            contrast=bool(rng.random() < self.contrast_probability),
            recon_offset=(float(rng.uniform(-15, 15)), float(rng.uniform(-20, 20))),
            size=size,
        )


@dataclass(frozen=True)
class Acquisition:
    """The settings of one phantom series, drawn from its profile."""

    profile: ScannerProfile
    pixel_spacing: float  # mm, square pixels
    slice_thickness: float  # mm
    slice_spacing: float  # mm between slice centres
    noise_hu: float
    tube_current_ma: float
    contrast: bool
    recon_offset: Tuple[float, float]  # patient (x, y) mm of the image centre
    size: int

    @property
    def fov_mm(self) -> float:
        return self.pixel_spacing * self.size


def storage_range(signed: bool, bits_stored: int) -> Tuple[int, int]:
    """Smallest and largest stored value."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def tissue_range(profile: ScannerProfile) -> Tuple[int, int]:
    """Stored values tissue may take: HU >= -1024 and never the padding value."""
    lo, hi = storage_range(profile.signed, profile.bits_stored)
    lo = max(lo, int(round(-1024 - profile.rescale_intercept)))
    if profile.padding_value is not None and profile.padding_value == lo:
        lo += 1
    return lo, hi


def apply_kernel(hu: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Reconstruction-kernel blur (and edge enhancement for sharp kernels)."""
    p = acq.profile
    sigma = p.blur_mm / acq.pixel_spacing
    out = cv2.GaussianBlur(hu, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) if sigma > 0.05 else hu.copy()
    if p.sharpen > 0:
        wide = cv2.GaussianBlur(out, (0, 0), max(1.2 / acq.pixel_spacing, 1.0), borderType=cv2.BORDER_REPLICATE)
        out += np.float32(p.sharpen) * (out - wide)
    return out


class NoiseModel:
    """Correlated (band-pass) quantum noise with the profile's grain and level."""

    def __init__(self, acq: Acquisition, rng: np.random.Generator):
        self.acq = acq
        self.rng = rng
        grain = acq.profile.noise_grain_mm / acq.pixel_spacing
        self.sigma_fine = max(grain, 0.3)
        self.sigma_wide = self.sigma_fine * 3.0
        probe = np.random.default_rng(12345).standard_normal((256, 256), dtype=np.float32)
        self.norm = 1.0 / float(self._texture(probe)[32:-32, 32:-32].std() + 1e-6)

    def _texture(self, white: np.ndarray) -> np.ndarray:
        fine = cv2.GaussianBlur(white, (0, 0), self.sigma_fine, borderType=cv2.BORDER_REFLECT)
        wide = cv2.GaussianBlur(white, (0, 0), self.sigma_wide, borderType=cv2.BORDER_REFLECT)
        return fine - np.float32(0.6) * wide  # ramp-like: little low-frequency power

    def sample(self, body: np.ndarray) -> np.ndarray:
        """Noise (HU) for one slice; ``body`` (occupancy) raises it inside the patient."""
        white = self.rng.standard_normal(body.shape, dtype=np.float32)
        # the level follows the body smoothly (about 20 mm): computed at 1/8 resolution
        h, w = body.shape
        small = cv2.resize(body.astype(np.float32), (max(w // 8, 1), max(h // 8, 1)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), 20.0 / (8 * self.acq.pixel_spacing))
        level = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        level = np.float32(self.acq.noise_hu * self.norm) * (np.float32(0.55) + np.float32(0.45) * level)
        return self._texture(white) * level


def fov_mask(size: int, fraction: float) -> np.ndarray:
    """True inside the reconstructed circle."""
    c = (size - 1) / 2.0
    r = fraction * size / 2.0
    yy, xx = np.ogrid[:size, :size]
    return (xx - c) ** 2 + (yy - c) ** 2 <= r * r


def to_stored(hu: np.ndarray, profile: ScannerProfile, inside_fov: np.ndarray) -> np.ndarray:
    """Quantise HU to stored integers; outside the field of view, padding (or the minimum)."""
    lo, hi = tissue_range(profile)
    stored = np.rint(hu - np.float32(profile.rescale_intercept))
    np.clip(stored, lo, hi, out=stored)
    dtype = np.int16 if profile.signed else np.uint16
    out = stored.astype(dtype)
    outside = profile.padding_value if profile.padding_value is not None else lo
    out[~inside_fov] = outside
    return out


PROFILES: Dict[str, ScannerProfile] = {
    p.name: p
    for p in (
        # --- seen in training and validation --------------------------------------------
        ScannerProfile(
            name="siemens_b30f", manufacturer="SIEMENS", model="SOMATOM Phantom 64", kernel="B30f",
            kvp=120, pixel_spacing_mm=(0.62, 0.80), slice_thickness_mm=(1.0, 1.5), spacing_ratio=(1.0, 0.7),
            noise_hu=(10, 22), noise_grain_mm=0.55, blur_mm=0.55, sharpen=0.0, rescale_intercept=-1024,
            signed=False, bits_stored=12, padding_value=None, fov_fraction=1.0, head_first=True,
            contrast_probability=0.3, window=(40.0, 400.0),
        ),
        ScannerProfile(
            name="ge_standard", manufacturer="GE MEDICAL SYSTEMS", model="LightSpeed Phantom VCT", kernel="STANDARD",
            kvp=120, pixel_spacing_mm=(0.65, 0.86), slice_thickness_mm=(1.25, 2.5), spacing_ratio=(1.0, 0.5),
            noise_hu=(12, 26), noise_grain_mm=0.6, blur_mm=0.5, sharpen=0.0, rescale_intercept=-1024,
            signed=True, padding_value=-2000, fov_fraction=1.0, head_first=True, contrast_probability=0.2,
        ),
        ScannerProfile(
            name="ge_lung", manufacturer="GE MEDICAL SYSTEMS", model="Discovery Phantom CT750", kernel="LUNG",
            kvp=120, pixel_spacing_mm=(0.62, 0.78), slice_thickness_mm=(0.625, 1.25), spacing_ratio=(1.0, 0.8),
            noise_hu=(30, 55), noise_grain_mm=0.35, blur_mm=0.3, sharpen=0.7, rescale_intercept=-1024,
            signed=True, padding_value=-2000, fov_fraction=1.0, head_first=True, window=(-600.0, 1500.0),
        ),
        ScannerProfile(
            name="philips_c", manufacturer="Philips", model="Brilliance Phantom 40", kernel="C",
            kvp=120, pixel_spacing_mm=(0.68, 0.90), slice_thickness_mm=(2.0, 1.0), spacing_ratio=(1.0, 0.5),
            noise_hu=(14, 30), noise_grain_mm=0.5, blur_mm=0.45, sharpen=0.25, rescale_intercept=-1024,
            signed=False, padding_value=0, fov_fraction=1.0, head_first=False, tube_current_ma=(100, 250),
        ),
        ScannerProfile(
            name="toshiba_fc13", manufacturer="TOSHIBA", model="Aquilion Phantom 64", kernel="FC13",
            kvp=120, pixel_spacing_mm=(0.60, 0.80), slice_thickness_mm=(1.0, 2.0), spacing_ratio=(1.0, 0.8),
            noise_hu=(10, 24), noise_grain_mm=0.7, blur_mm=0.6, sharpen=0.0, rescale_intercept=-1000,
            signed=True, padding_value=-2000, fov_fraction=0.98, head_first=True, contrast_probability=0.25,
            window=(40.0, 350.0), write_spacing_between_slices=False,
        ),
        # --- held out: only in the test split ----------------------------------------------
        ScannerProfile(
            name="siemens_br64_sharp", manufacturer="SIEMENS", model="SOMATOM Phantom Force", kernel="Br64d",
            kvp=100, pixel_spacing_mm=(0.60, 0.74), slice_thickness_mm=(0.75, 1.0), spacing_ratio=(0.67, 1.0),
            noise_hu=(35, 65), noise_grain_mm=0.3, blur_mm=0.25, sharpen=0.9, rescale_intercept=-1024,
            signed=True, padding_value=-3024, fov_fraction=1.0, head_first=False,
        ),
        ScannerProfile(
            name="canon_fc52_lowdose", manufacturer="CANON_MEC", model="Aquilion ONE Phantom", kernel="FC52",
            kvp=100, pixel_spacing_mm=(0.66, 0.84), slice_thickness_mm=(0.625, 1.0), spacing_ratio=(1.0, 0.8),
            noise_hu=(45, 80), noise_grain_mm=0.8, blur_mm=0.45, sharpen=0.4, rescale_intercept=-1000,
            signed=False, padding_value=0, fov_fraction=0.96, head_first=True, tube_current_ma=(30, 80),
        ),
        ScannerProfile(
            name="philips_yb_thick", manufacturer="Philips", model="IQon Phantom", kernel="YB",
            kvp=120, pixel_spacing_mm=(0.70, 0.90), slice_thickness_mm=(2.5, 2.0), spacing_ratio=(1.0,),
            noise_hu=(8, 16), noise_grain_mm=0.9, blur_mm=0.75, sharpen=0.0, rescale_intercept=-1000,
            signed=True, padding_value=-2048, fov_fraction=1.0, head_first=False, contrast_probability=0.4,
            window=(40.0, 400.0), write_spacing_between_slices=False,
        ),
    )
}


def get_profile(name: str) -> ScannerProfile:
    """Look up a named profile; raises ConfigError for unknown names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown scanner profile {name!r} (known: {', '.join(sorted(PROFILES))})") from None
