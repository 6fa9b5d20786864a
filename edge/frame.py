"""One decoded CT frame: stored pixels plus everything needed to turn them into HU."""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from edge.geometry import SliceGeometry


@dataclass
class CTFrame:
    """A single CT image plane as stored, with its HU conversion and geometry.

    ``pixels`` are the stored values (2-D, rows x columns), int16 or uint16,
    already inverted for nothing: the modality LUT (slope/intercept) maps them
    to HU whatever the photometric interpretation, which only affects display.
    ``padding`` is the inclusive range of stored values that mark pixels outside
    the reconstructed field of view (PixelPaddingValue [.. PixelPaddingRangeLimit]),
    or None. Padding is masked *before* rescale, so it never becomes tissue.
    """

    pixels: np.ndarray
    rescale_slope: float
    rescale_intercept: float
    geometry: SliceGeometry
    padding: Optional[Tuple[int, int]] = None
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    instance_number: Optional[int] = None
    frame_index: int = 0  # 0-based frame of a multi-frame (Enhanced CT) instance
    image_type: Tuple[str, ...] = ()
    photometric: str = "MONOCHROME2"
    is_localizer: bool = False
    source: Optional[str] = None  # file path, for error messages
    notes: Tuple[str, ...] = field(default=())  # defaults that were applied, e.g. missing rescale

    @property
    def padding_mask(self) -> Optional[np.ndarray]:
        """Boolean mask of padding pixels, or None when the frame has no padding."""
        if self.padding is None:
            return None
        lo, hi = self.padding
        return (self.pixels >= lo) & (self.pixels <= hi)

    def hu(self, fill_hu: float = -1024.0) -> np.ndarray:
        """Hounsfield units as float32; padding pixels become ``fill_hu``."""
        out = self.pixels.astype(np.float32) * np.float32(self.rescale_slope) + np.float32(self.rescale_intercept)
        mask = self.padding_mask
        if mask is not None:
            out[mask] = fill_hu
        return out
