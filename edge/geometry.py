"""Slice geometry: pixel indices <-> patient coordinates (DICOM LPS, millimetres)."""

from dataclasses import dataclass
from functools import cached_property
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class SliceGeometry:
    """Where one image plane sits in patient space.

    ``position`` is ImagePositionPatient: the centre of the first transmitted
    pixel (row 0, column 0). ``row_direction`` is the direction of increasing
    column index and ``column_direction`` of increasing row index
    (ImageOrientationPatient[:3] and [3:]). ``pixel_spacing`` is
    (row spacing, column spacing) in mm, as PixelSpacing stores it.
    """

    rows: int
    columns: int
    pixel_spacing: Tuple[float, float]
    position: Tuple[float, float, float]
    row_direction: Tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: Tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_thickness: float = 0.0

    @cached_property
    def normal(self) -> np.ndarray:
        """Unit normal of the plane (row_direction x column_direction); read-only, computed once."""
        n = np.cross(np.asarray(self.row_direction, float), np.asarray(self.column_direction, float))
        n = n / np.linalg.norm(n)
        n.flags.writeable = False
        return n

    @cached_property
    def slice_location(self) -> float:
        """Signed position of the plane along its normal, in mm (for ordering slices)."""
        return float(np.dot(np.asarray(self.position, float), self.normal))

    def pixel_to_patient(self, row, col) -> np.ndarray:
        """Patient (x, y, z) mm of fractional pixel centre(s) (row, col); broadcasts."""
        row = np.asarray(row, float)[..., None]
        col = np.asarray(col, float)[..., None]
        p = np.asarray(self.position, float)
        r = np.asarray(self.row_direction, float) * self.pixel_spacing[1]
        c = np.asarray(self.column_direction, float) * self.pixel_spacing[0]
        return p + col * r + row * c

    def patient_to_pixel(self, xyz) -> Tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) of patient point(s) projected onto the plane."""
        d = np.asarray(xyz, float) - np.asarray(self.position, float)
        col = d @ np.asarray(self.row_direction, float) / self.pixel_spacing[1]
        row = d @ np.asarray(self.column_direction, float) / self.pixel_spacing[0]
        return row, col
