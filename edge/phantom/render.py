"""Rendering the scene slab by slab, with slice-thickness partial volume.

Smooth anatomy is drawn once per slice at its centre. Small and oblique
objects (tube layers, nodules) are drawn on a fine z grid (<= 0.5 mm) and
each slice averages the fine planes inside its slab ``centre +- thickness/2``
(a box slice-sensitivity profile), so a thick slice blurs a small vessel or
nodule along z exactly as averaging the volume would. The fine grid is only
built chunk by chunk and only over the body's bounding box.
"""

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge.phantom.anatomy import AnatomyPlane
from edge.phantom.nodules import NoduleShape, render_nodule
from edge.phantom.shapes import TubeSet

FINE_STEP_MM = 0.5
CHUNK_FINE_PLANES = 48


@dataclass
class TubeLayer:
    """A tube set drawn with one HU value, composited in list order.

    ``yields_to_nodules``: a nodule displaces the layer where they overlap (airways:
    a nodule growing around a bronchus fills it; without this the air lumen would
    erase the nodule). Vessels do not yield: they run into and through nodules.
    """

    name: str
    tubes: TubeSet
    hu: float
    yields_to_nodules: bool = False


def composite_layers(hu: np.ndarray, layers: Sequence[TubeLayer], fractions: Sequence[Optional[np.ndarray]],
                     nodule_fraction: Optional[np.ndarray]) -> None:
    """Draw tube layers (occupancy ``fractions``, None: absent) over ``hu`` (nodules already in it), in place."""
    for layer, occ in zip(layers, fractions):
        if occ is None:
            continue
        if layer.yields_to_nodules and nodule_fraction is not None:
            occ = occ * (1.0 - nodule_fraction)
        hu += occ * (np.float32(layer.hu) - hu)


def slab_weights(z_centres: np.ndarray, thickness: float, z_fine: np.ndarray, step: float) -> np.ndarray:
    """(n_slices, n_fine) weights: overlap of each fine plane's extent with each slab, / thickness."""
    lo = z_centres[:, None] - thickness / 2.0
    hi = z_centres[:, None] + thickness / 2.0
    f_lo = z_fine[None, :] - step / 2.0
    f_hi = z_fine[None, :] + step / 2.0
    overlap = np.clip(np.minimum(hi, f_hi) - np.maximum(lo, f_lo), 0.0, None)
    return (overlap / thickness).astype(np.float32)


class SceneRenderer:
    """Noiseless HU slices of one phantom: anatomy + tube layers + nodules."""

    def __init__(self, plane: AnatomyPlane, background: np.ndarray, crop: Tuple[int, int, int, int],
                 layers: Sequence[TubeLayer], nodules: Sequence[NoduleShape]):
        self.plane = plane  # drawn on the crop's grid
        self.background = background  # full image: air and table
        self.crop = crop  # row0, row1, col0, col1 of the plane in the full image
        self.layers: List[TubeLayer] = list(layers)
        self.nodules = list(nodules)

    def slices(self, z_centres: Sequence[float], thickness: float, spacing: float
               ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """Yield (index, HU image, body occupancy) for slices at ascending ``z_centres``."""
        z = np.asarray(z_centres, np.float64)
        n_sub = max(1, int(np.ceil(spacing / FINE_STEP_MM - 1e-9)))
        step = spacing / n_sub
        z_fine0 = z[0] - thickness / 2.0 + step / 2.0
        n_fine = int(np.ceil(((z[-1] - z[0]) + thickness) / step - 1e-9))
        z_fine = z_fine0 + step * np.arange(n_fine)
        per_chunk = max(1, int((CHUNK_FINE_PLANES * step - thickness) // spacing) + 1)
        r0, r1, c0, c1 = self.crop
        xs, ys, soft = self.plane.xs, self.plane.ys, self.plane.soft
        for first in range(0, len(z), per_chunk):
            idx = np.arange(first, min(first + per_chunk, len(z)))
            zc = z[idx]
            j0 = max(0, int(np.floor((zc[0] - thickness / 2.0 - z_fine0) / step)))
            j1 = min(n_fine, int(np.ceil((zc[-1] + thickness / 2.0 - z_fine0) / step)) + 1)
            zf = z_fine[j0:j1].astype(np.float32)
            w = slab_weights(zc, thickness, z_fine[j0:j1], step)
            shape = (len(zf), len(ys), len(xs))
            averaged = []
            for layer in self.layers:
                occ = np.zeros(shape, np.uint8)
                layer.tubes.render(occ, xs, ys, zf, soft)
                averaged.append(self._average(w, occ, 1.0 / 255.0))
            nod_f = nod_v = None
            if self.nodules:
                frac = np.zeros(shape, np.float32)
                val = np.zeros(shape, np.float32)
                for nod in self.nodules:
                    render_nodule(nod, frac, val, xs, ys, zf, soft)
                if frac.any():
                    nod_f = self._average(w, frac, 1.0)
                    nod_v = self._average(w, val, 1.0)
            for g, i in enumerate(idx):
                hu_crop, body_crop = self.plane.render(float(zc[g]))
                nodule_g = nod_f[g] if nod_f is not None else None
                if nodule_g is not None:
                    hu_crop *= 1.0 - nodule_g
                    hu_crop += nod_v[g]
                composite_layers(hu_crop, self.layers, [a[g] if a is not None else None for a in averaged], nodule_g)
                hu = self.background.copy()
                hu[r0:r1, c0:c1] = hu_crop
                body = np.zeros(hu.shape, np.float32)
                body[r0:r1, c0:c1] = body_crop
                yield int(i), hu, body

    @staticmethod
    def _average(w: np.ndarray, fine: np.ndarray, scale: float):
        """Slab averages of fine planes, or None when nothing was drawn."""
        if not fine.any():
            return None
        drawn = fine.reshape(fine.shape[0], -1).any(axis=1)
        out = []
        for row in w:
            acc = None
            for j in np.flatnonzero((row > 0) & drawn):
                term = fine[j].astype(np.float32) * np.float32(row[j] * scale)
                acc = term if acc is None else acc + term
            out.append(acc)
        return out
