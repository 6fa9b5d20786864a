"""Overlay PNG: the key slice in the lung window with a circle around the finding."""

from types import SimpleNamespace

import cv2
import numpy as np

from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess.spec import Window
from edge.outputs.overlay import CIRCLE_COLOUR, finding_pixel, render_overlay, window_to_uint8, write_overlay


def frame(size=64, spacing=0.8):
    pixels = np.full((size, size), 1024 - 850, np.int16)
    pixels[10:20, 40:50] = 1024 + 40
    geometry = SliceGeometry(size, size, (spacing, spacing), (-20.0, -30.0, 12.0))
    return CTFrame(pixels=pixels, rescale_slope=1.0, rescale_intercept=-1024.0, geometry=geometry)


def test_circle_is_drawn_around_the_finding():
    f = frame()
    x, y = -20.0 + 45 * 0.8, -30.0 + 15 * 0.8  # centre of the bright block: row 15, column 45
    finding = SimpleNamespace(x=x, y=y, z=12.0, diameter_mm=8.0)
    assert finding_pixel(f, (x, y, 12.0)) == (15.0, 45.0)
    image = render_overlay(f, finding)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    red = np.all(image == CIRCLE_COLOUR, axis=-1) | ((image[..., 2] > 150) & (image[..., 0] < 100))
    rows, cols = np.nonzero(red)
    assert abs(rows.mean() - 15) < 1.5 and abs(cols.mean() - 45) < 1.5
    radius = np.hypot(rows - 15, cols - 45)
    assert 4 <= radius.mean() <= 10
    # outside the circle the image is the windowed slice, grey
    gray = window_to_uint8(f)
    assert image[40, 10, 0] == image[40, 10, 2] == gray[40, 10]


def test_window_maps_lung_window_to_0_255():
    gray = window_to_uint8(frame())
    assert gray[0, 0] == round((-850 + 1350) / 1500 * 255)
    assert gray[15, 45] == round((40 + 1350) / 1500 * 255)
    assert window_to_uint8(frame(), window=Window(40, 400))[0, 0] == 0  # below the window: black


def test_written_png_reads_back(tmp_path):
    f = frame()
    path = write_overlay(tmp_path / "a" / "f.png", f, SimpleNamespace(x=0.0, y=0.0, z=12.0, diameter_mm=5.0), "#1")
    image = cv2.imread(str(path))
    assert image.shape == (64, 64, 3)
