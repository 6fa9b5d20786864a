"""Overlay PNG of a finding's key slice, for a person to look at: lung window, a circle at the finding.

The finding's centre (patient mm) is projected onto the key slice; the circle's
radius is half the finding's diameter, at least a few pixels so small nodules
stay visible. The image carries no patient data (no burned-in text but the
finding's number, diameter and probability).
"""

from pathlib import Path
from typing import Tuple

import cv2
import numpy as np

from edge.frame import CTFrame
from edge.ingest.spool import write_durably
from edge.preprocess.spec import WINDOW_PRESETS, Window

CIRCLE_COLOUR = (0, 0, 255)  # BGR red
MIN_RADIUS_PX = 6


def window_to_uint8(frame: CTFrame, window: Window = WINDOW_PRESETS["lung"]) -> np.ndarray:
    """The frame in HU, windowed to 0..255 (padding shows as the window's low end)."""
    hu = frame.hu(fill_hu=window.low)
    unit = np.clip((hu - window.low) / window.width, 0.0, 1.0)
    return (unit * 255.0 + 0.5).astype(np.uint8)


def finding_pixel(frame: CTFrame, xyz) -> Tuple[float, float]:
    """(row, col) of a patient point projected onto the frame."""
    row, col = frame.geometry.patient_to_pixel(np.asarray(xyz, float))
    return float(row), float(col)


def render_overlay(frame: CTFrame, finding, label: str = "", window: Window = WINDOW_PRESETS["lung"]) -> np.ndarray:
    """BGR uint8 image of ``frame`` with a circle around ``finding`` (anything with x, y, z, diameter_mm)."""
    gray = window_to_uint8(frame, window)
    image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    row, col = finding_pixel(frame, (finding.x, finding.y, finding.z))
    spacing = float(np.mean(frame.geometry.pixel_spacing))
    radius = max(MIN_RADIUS_PX, int(round(0.5 * finding.diameter_mm / spacing)) + 3)
    thickness = max(1, image.shape[0] // 256)
    centre = (int(round(col)), int(round(row)))
    cv2.circle(image, centre, radius, CIRCLE_COLOUR, thickness, lineType=cv2.LINE_AA)
    if label:
        scale = max(0.35, image.shape[0] / 1024)
        origin = (4, int(image.shape[0] - 6))
        cv2.putText(image, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, CIRCLE_COLOUR, thickness, cv2.LINE_AA)
    return image


def write_overlay(path, frame: CTFrame, finding, label: str = "") -> Path:
    """Render and write a PNG atomically; returns the path."""
    ok, encoded = cv2.imencode(".png", render_overlay(frame, finding, label))
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_durably(path, encoded.tobytes())
