"""Oblique bones as tubes: ribs with their costal cartilages, and the clavicles.

Ribs leave the spine at their vertebra, wrap around the inner chest wall and
descend towards the front, so an axial slice cuts several of them into
short oval profiles around the lungs, as on a real scan.
"""

from dataclasses import dataclass

import numpy as np

from edge.phantom.anatomy import Anatomy
from edge.phantom.shapes import TubeSet, table_angles


@dataclass
class Skeleton:
    cortex: TubeSet  # outer bone surface
    marrow: TubeSet  # inside the cortex
    cartilage: TubeSet


def _cavity_radius(anatomy: Anatomy, theta: float, z: float) -> float:
    table = anatomy.cavity_table(z)
    th = table_angles()
    i = int(np.round((np.angle(np.exp(1j * theta)) + np.pi) / (2 * np.pi) * len(th))) % len(th)
    return float(table[i])


def build_skeleton(anatomy: Anatomy, rng: np.random.Generator) -> Skeleton:
    a = anatomy
    cortex_paths, cartilage_paths = [], []
    z_t1 = a.z_apex + rng.uniform(5, 20)
    for k in range(12):
        z_head = z_t1 - k * a.vert_period * rng.uniform(0.97, 1.03)
        r_rib = rng.uniform(3.6, 5.0) if k else rng.uniform(4.5, 6.0)
        drop = rng.uniform(95, 135) * (0.4 if k == 0 else 0.7 if k in (1, 10, 11) else 1.0)
        # how far round the chest the bony rib reaches (0 = back, 1 = front at the sternum)
        reach = 0.9 if k < 7 else (0.78 - 0.08 * (k - 7))
        if k >= 10:
            reach = 0.35 + 0.08 * (11 - k)
        for side in (-1.0, 1.0):
            theta_back = np.pi / 2 - side * np.deg2rad(rng.uniform(28, 36))
            theta_front = -np.pi / 2 + side * np.deg2rad(rng.uniform(6, 14))
            # go round the lateral side: right side through 180 degrees, left through 0
            if side < 0:
                span = (theta_front + 2 * np.pi) - theta_back
            else:
                span = theta_front - theta_back
            head = np.array([a.cx + side * (a.vb_radius + 4), a.spine_y + 3, z_head])
            tubercle = np.array([a.cx + side * (a.vb_radius + 16), a.spine_y + a.vb_radius + 6, z_head - 3])
            pts = [head, tubercle]
            n = 18
            for i in range(1, n + 1):
                f = i / n * reach
                th = theta_back + span * f
                z = z_head - 3 - drop * f ** 1.25
                rho = _cavity_radius(a, th, z) + r_rib + 0.8
                pts.append(np.array([a.cx + rho * np.cos(th), a.cy + rho * np.sin(th), z]))
            pts = np.asarray(pts)
            cortex_paths.append((pts, r_rib))
            if k < 10:
                # costal cartilage on to the sternum (ribs 1-7) or the costal margin
                end = pts[-1]
                if k < 7:
                    target = np.array([a.cx + side * 14.0, end[1] - 4.0, end[2] + rng.uniform(0, 6) + 3 * k])
                else:
                    target = np.array([a.cx + side * (30.0 + 10 * (k - 7)), end[1] + 6.0, end[2] + 30.0])
                mid = 0.5 * (end + target) + np.array([0.0, -3.0, 0.0])
                cartilage_paths.append((np.array([end, mid, target]), r_rib * 0.95))
    # clavicles, above the lung apices
    for side in (-1.0, 1.0):
        r = rng.uniform(5.5, 7.5)
        medial = np.array([a.cx + side * 18.0, a.cy - a.cav_b_front - 5.0, a.z_apex + rng.uniform(0, 10)])
        mid = medial + np.array([side * 0.45 * a.body_a, 8.0, 12.0])
        lateral = medial + np.array([side * 0.85 * a.body_a, 30.0, 18.0])
        cortex_paths.append((np.array([medial, mid, lateral]), r))
    cortex = TubeSet.concat([TubeSet.from_path(p, np.full(len(p), r)) for p, r in cortex_paths])
    marrow = TubeSet.concat([TubeSet.from_path(p, np.full(len(p), r - 1.6)) for p, r in cortex_paths])
    cartilage = TubeSet.concat([TubeSet.from_path(p, np.full(len(p), r)) for p, r in cartilage_paths])
    return Skeleton(cortex, marrow, cartilage)
