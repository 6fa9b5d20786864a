"""The phantom patient's chest: body, lungs, mediastinum, abdomen top, spine, table.

Everything here varies smoothly along z and is drawn plane by plane at a
slice centre (:class:`AnatomyPlane`). Small or oblique structures whose
partial volume matters (lung vessels, bronchi, ribs, nodules) are tube sets
rendered on a fine z grid elsewhere (vessels.py, skeleton.py, nodules.py).

Patient coordinates are LPS millimetres: x to the patient's left, y to the
back, z to the head. z = 0 is the carina. Polar angles are ``atan2(y, x)``
around the body centre, so +90 degrees points to the back.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from edge.phantom.shapes import (
    PolarFrame,
    TubeSet,
    ellipse_occupancy,
    smoothstep,
    soft_step,
    superellipse_radius,
    table_angles,
)
from edge.phantom.texture import SmoothField

AIR_HU = -1000.0
PA_END_OFFSET = np.array([0.0, -8.0, 4.0])  # where a main pulmonary artery ends, from its hilum point


@dataclass
class Tissues:
    """Hounsfield units of one patient's tissues (contrast-enhanced or not)."""

    fat: float
    muscle: float
    lung: float  # parenchyma at the front (non-dependent) of the lung
    lung_gradient: float  # HU added from front to back (gravity)
    lung_texture: float  # SD of parenchymal texture
    blood_artery: float  # systemic arteries, aorta
    blood_pulmonary: float  # pulmonary arteries
    blood_vein: float  # pulmonary veins, heart
    blood_systemic_vein: float  # SVC, IVC
    myocardium: float
    liver: float
    spleen: float
    stomach: float
    cortex: float
    trabecular: float
    disc: float
    csf: float
    cartilage: float
    airway_wall: float
    contrast: bool


@dataclass
class Anatomy:
    """Sampled dimensions of one phantom patient (mm, LPS; z = 0 at the carina)."""

    cx: float
    cy: float
    body_a: float
    body_b_front: float
    body_b_back: float
    body_n: float
    fat_mm: float
    fat_front_gain: float
    breast_mm: float  # 0 for none
    cav_a: float
    cav_b_front: float
    cav_b_back: float
    cav_n: float
    z_apex: float
    z_dome_right: float
    z_dome_left: float
    z_recess: float
    z_body_top: float
    spine_y: float
    vb_radius: float
    vert_period: float
    vert_phase: float
    disc_mm: float
    med_x: float
    med_half_front: float
    med_half_back: float
    heart_center: np.ndarray
    heart_axes: np.ndarray
    heart_yaw: float
    heart_fat_mm: float
    trachea_x: float
    trachea_y: float
    trachea_r: float
    trachea_wall: float
    carina: np.ndarray
    hilum_right: np.ndarray
    hilum_left: np.ndarray
    atrium: np.ndarray
    table_gap: float
    table_pad: float
    table_thickness: float
    table_curve: float
    stomach_gas: float  # fraction of the stomach's depth filled with gas
    emphysema: float  # 0..1 severity
    dependent_density: float  # HU of posterior dependent opacity, 0 for none
    tissues: Tissues
    pa_radius: float = 12.0
    pa_trunk_top: np.ndarray = field(default_factory=lambda: np.zeros(3))
    mediastinal_tubes: List[Tuple[TubeSet, str]] = field(default_factory=list)
    pulmonary_arteries: List[Tuple[TubeSet, str]] = field(default_factory=list)
    _tables: Dict = field(default_factory=dict, repr=False)

    @property
    def great_vessels(self) -> List[Tuple[TubeSet, str]]:
        """All mediastinal tubes (aorta, veins, oesophagus, pulmonary arteries) with tissue names."""
        return self.mediastinal_tubes + self.pulmonary_arteries

    def set_hila(self, right, left) -> None:
        """Move the hila (where the lung trees start) and re-route the pulmonary arteries to them."""
        self.hilum_right = np.asarray(right, np.float64)
        self.hilum_left = np.asarray(left, np.float64)
        self.pulmonary_arteries = pulmonary_artery_tubes(self)

    def heart_matrix(self, grow: float = 0.0) -> np.ndarray:
        """Quadratic form M of the heart ellipsoid (x - c)^T M (x - c) <= 1, axes + ``grow`` mm."""
        c, s = np.cos(self.heart_yaw), np.sin(self.heart_yaw)
        tilt = np.deg2rad(25.0)  # apex points down as well as left and forward
        rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        ry = np.array([[np.cos(tilt), 0, np.sin(tilt)], [0, 1, 0], [-np.sin(tilt), 0, np.cos(tilt)]])
        rot = rz @ ry
        d = np.diag(1.0 / (np.asarray(self.heart_axes) + grow) ** 2)
        return rot @ d @ rot.T

    def body_table(self, z: float) -> np.ndarray:
        """Polar radius table of the skin outline at z."""
        return self._memo("body", z, self._body_table)

    def fat_table(self, z: float) -> np.ndarray:
        """Subcutaneous fat thickness (mm) per polar angle at z (breasts included)."""
        return self._memo("fat", z, self._fat_table)

    def cavity_table(self, z: float) -> np.ndarray:
        """Polar radius table of the inner chest wall (ribcage) at z."""
        return self._memo("cavity", z, self._cavity_table)

    def inlet_scale(self, z: float) -> float:
        """Width of the ribcage at z relative to mid-chest: it narrows over the top 7 cm."""
        return 1.0 - 0.4 * float(smoothstep((z - (self.z_apex - 70.0)) / 90.0))

    def _memo(self, name, z, fn):
        key = (name, float(z))
        out = self._tables.get(key)
        if out is None:
            if len(self._tables) > 64:
                self._tables.clear()
            out = self._tables[key] = fn(z)
        return out

    def _body_table(self, z: float) -> np.ndarray:
        th = table_angles()
        taper = 1.0 - 0.03 * smoothstep((z - self.z_apex + 20.0) / 60.0)
        r = superellipse_radius(th, self.body_a * taper, self.body_b_front, self.body_b_back, self.body_n)
        if self.breast_mm > 0:
            zc = self.z_dome_right + 45.0
            zw = np.exp(-0.5 * ((z - zc) / 45.0) ** 2)
            for centre in (-np.pi / 2 - 0.75, -np.pi / 2 + 0.75):
                r = r + self.breast_mm * zw * np.exp(-0.5 * (_angle_diff(th, centre) / 0.35) ** 2)
        return r

    def _fat_table(self, z: float) -> np.ndarray:
        th = table_angles()
        front = np.clip(-np.sin(th), 0, None)
        t = self.fat_mm * (1.0 + self.fat_front_gain * front + 0.25 * np.cos(2 * th))
        t *= 1.0 - 0.6 * np.exp(-0.5 * (_angle_diff(th, np.pi / 2) / 0.25) ** 2)  # thin over the spine
        if self.breast_mm > 0:
            t = t + (self.body_table(z) - self.body_table(self.z_apex + 100.0))
        return np.maximum(t, 2.0)

    def _cavity_table(self, z: float) -> np.ndarray:
        th = table_angles()
        # the upper thorax narrows to the thoracic inlet
        s = self.inlet_scale(z)
        sb = 1.0 - 0.2 * smoothstep((z - (self.z_apex - 60.0)) / 80.0)
        r = superellipse_radius(th, self.cav_a * s, self.cav_b_front * sb, self.cav_b_back, self.cav_n)
        wall_min = 9.0 + 30.0 * np.clip(np.sin(th), 0, None) ** 6
        limit = self.body_table(z) - self.fat_table(z) - wall_min
        return np.minimum(r, limit)

    def diaphragm_z(self, x, y) -> np.ndarray:
        """Height of the diaphragm surface (mm) under each (x, y): lung only above it."""
        out = None
        depth = 0.5 * (self.cav_b_front + self.cav_b_back)
        for side, z_top in ((-1.0, self.z_dome_right), (1.0, self.z_dome_left)):
            xs = self.cx + side * 0.42 * self.cav_a
            ys = self.cy - 0.15 * self.cav_b_front
            drop = z_top - self.z_recess
            q = ((x - xs) / (0.78 * self.cav_a)) ** 2 + ((y - ys) / (0.95 * depth)) ** 2
            zz = z_top - drop * q
            out = zz if out is None else np.maximum(out, zz)
        return out


def _angle_diff(a, b):
    return np.angle(np.exp(1j * (np.asarray(a) - b)))


def sample_tissues(rng: np.random.Generator, contrast: bool) -> Tissues:
    """Tissue HU for one patient."""
    u = rng.uniform
    if contrast:
        art = u(160, 360)
        pul = art + u(-60, 120)
        ven = art + u(-40, 40)
        sys_vein = u(120, 500)
        myo = u(90, 130)
        liver = u(80, 110)
        spleen = u(100, 140)
    else:
        art = u(32, 50)
        pul, ven, sys_vein = art + u(-4, 4), art + u(-4, 4), art + u(-4, 4)
        myo = art + u(-2, 6)
        liver = u(48, 68)
        spleen = u(40, 52)
    return Tissues(
        fat=u(-118, -85),
        muscle=u(35, 58),
        lung=u(-885, -790),
        lung_gradient=u(15, 110),
        lung_texture=u(12, 30),
        blood_artery=art,
        blood_pulmonary=pul,
        blood_vein=ven,
        blood_systemic_vein=sys_vein,
        myocardium=myo,
        liver=liver,
        spleen=spleen,
        stomach=u(5, 30),
        cortex=u(700, 1150),
        trabecular=u(170, 380),
        disc=u(70, 100),
        csf=u(5, 25),
        cartilage=u(80, 220),
        airway_wall=u(20, 60),
        contrast=contrast,
    )


def sample_anatomy(rng: np.random.Generator, contrast: bool = False) -> Anatomy:
    """Draw one patient's chest dimensions."""
    u = rng.uniform
    body_a = u(135, 185)
    depth = u(95, 130)
    back_share = u(0.46, 0.52)
    body_b_front = 2 * depth * (1 - back_share)
    body_b_back = 2 * depth * back_share
    fat = 3.0 + 20.0 * rng.beta(1.5, 2.5)
    cx, cy = u(-15, 15), u(-25, 25)
    # chest wall: fat + muscle (+ ribs) laterally, thick paraspinal muscles at the back
    wall = u(7, 13)
    cav_a = body_a - fat - wall
    cav_b_front = body_b_front - fat * 1.3 - u(10, 18)
    cav_b_back = body_b_back - fat * 0.3 - u(26, 38)
    lung_h = u(205, 285)
    z_apex = 0.40 * lung_h + u(-8, 8)
    z_dome_right = z_apex - 0.80 * lung_h + u(-10, 10)
    z_dome_left = z_dome_right - u(8, 28)
    z_recess = min(z_dome_right, z_dome_left) - u(40, 70)
    vb_r = u(15, 21)
    spine_y = cy + body_b_back - fat * 0.3 - u(60, 72)
    trachea_r = u(7.5, 10.5)
    trachea_y = spine_y - vb_r - u(12, 18) - trachea_r
    trachea_x = cx + u(-4, 4)
    heart_axes = np.array([u(48, 62), u(34, 44), u(42, 55)])
    heart_c = np.array([cx + u(18, 36), cy - cav_b_front * u(0.25, 0.45), z_dome_right + u(38, 52)])
    carina = np.array([trachea_x, trachea_y + 4.0, 0.0])
    hilum_y = trachea_y + u(0, 10)
    anat = Anatomy(
        cx=cx,
        cy=cy,
        body_a=body_a,
        body_b_front=body_b_front,
        body_b_back=body_b_back,
        body_n=u(2.2, 3.0),
        fat_mm=fat,
        fat_front_gain=u(0.0, 0.8),
        breast_mm=u(15, 55) if rng.random() < 0.35 else 0.0,
        cav_a=cav_a,
        cav_b_front=cav_b_front,
        cav_b_back=cav_b_back,
        cav_n=u(2.0, 2.6),
        z_apex=z_apex,
        z_dome_right=z_dome_right,
        z_dome_left=z_dome_left,
        z_recess=z_recess,
        z_body_top=z_apex + 60.0,
        spine_y=spine_y,
        vb_radius=vb_r,
        vert_period=u(23, 29),
        vert_phase=u(0, 30),
        disc_mm=u(4, 8),
        med_x=cx + u(-2, 8),
        med_half_front=u(2, 9),
        med_half_back=trachea_r + u(6, 12),
        heart_center=heart_c,
        heart_axes=heart_axes,
        heart_yaw=np.deg2rad(u(-40, -15)),
        heart_fat_mm=u(2, 8),
        trachea_x=trachea_x,
        trachea_y=trachea_y,
        trachea_r=trachea_r,
        trachea_wall=u(1.3, 2.5),
        carina=carina,
        hilum_right=np.array([cx - u(38, 52), hilum_y, u(-22, -10)]),
        hilum_left=np.array([cx + u(38, 52), hilum_y, u(-12, 0)]),
        atrium=np.array([heart_c[0] - u(10, 20), trachea_y + u(8, 20), u(-55, -35)]),
        table_gap=u(0, 4),
        table_pad=u(0, 25) if rng.random() < 0.6 else 0.0,
        table_thickness=u(35, 60),
        table_curve=u(0.0, 0.0006),
        stomach_gas=u(0.1, 0.6) if rng.random() < 0.6 else 0.0,
        emphysema=u(0.3, 1.0) if rng.random() < 0.2 else 0.0,
        dependent_density=u(-680, -450) if rng.random() < 0.3 else 0.0,
        tissues=sample_tissues(rng, contrast),
    )
    anat.pa_radius = u(11, 15)
    anat.pa_trunk_top = np.array([cx + u(8, 16), trachea_y - u(8, 16), u(-12, -4)])
    anat.mediastinal_tubes = mediastinal_tubes(anat, rng)
    anat.pulmonary_arteries = pulmonary_artery_tubes(anat)
    return anat


def _spline(points, n_per: int = 6) -> np.ndarray:
    """Catmull-Rom polyline through ``points`` (smooth great-vessel paths)."""
    p = np.asarray(points, np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for t in np.linspace(0, 1, n_per, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(p[-1])
    return np.asarray(out)


def mediastinal_tubes(a: Anatomy, rng: np.random.Generator) -> List[Tuple[TubeSet, str]]:
    """Great vessels and oesophagus as (tube set, tissue name) pairs."""
    u = rng.uniform
    hc = a.heart_center
    top = a.z_body_top + 40.0
    bottom = a.z_recess - 120.0
    r_ao = u(11, 16)
    desc_x = a.cx + a.vb_radius + r_ao * 0.6 + u(0, 6)
    desc_y = a.spine_y - a.vb_radius * 0.6
    arch_z = u(28, 45)
    aorta = _spline([
        [hc[0] - 25, hc[1] - 5, hc[2] + 10],
        [a.cx - u(5, 15), a.trachea_y - a.trachea_r - r_ao - u(3, 10), arch_z - 30],
        [a.cx - 2, a.trachea_y - r_ao, arch_z + r_ao * 0.5],
        [desc_x - 5, a.trachea_y + 10, arch_z],
        [desc_x, desc_y, arch_z - 40],
        [desc_x - 5, desc_y + 2, bottom],
    ])
    tubes = [(TubeSet.from_path(aorta, np.full(len(aorta), r_ao)), "blood_artery")]
    # arch branches up to the neck
    for dx, r in ((-12.0, u(5, 7)), (-1.0, u(3.5, 5)), (9.0, u(4, 6))):
        base = np.array([a.cx + dx, a.trachea_y - r_ao * 0.6, arch_z + r_ao * 0.6])
        tip = base + np.array([dx * 1.5, u(-5, 5), top - base[2]])
        tubes.append((TubeSet.from_path([base, tip], [r, r]), "blood_artery"))
    # superior and inferior vena cava, azygos
    svc_x = a.cx - r_ao - u(14, 22)
    svc = [[svc_x, a.trachea_y - u(5, 15), hc[2] + 20], [svc_x + u(-4, 4), a.trachea_y - u(0, 10), top]]
    tubes.append((TubeSet.from_path(svc, [u(8, 11)] * 2), "blood_systemic_vein"))
    ivc = [[a.cx - u(10, 25), a.spine_y - a.vb_radius - u(15, 25), hc[2] - 20], [a.cx - u(15, 30), a.spine_y - a.vb_radius - 20, bottom]]
    tubes.append((TubeSet.from_path(ivc, [u(9, 13)] * 2), "blood_systemic_vein"))
    az = [[a.cx - a.vb_radius * 0.5, a.spine_y - a.vb_radius - 2, bottom], [a.cx - a.vb_radius * 0.6, a.spine_y - a.vb_radius - 3, 10.0]]
    tubes.append((TubeSet.from_path(az, [3.0, 3.5]), "blood_systemic_vein"))
    # oesophagus between trachea and spine, slightly left
    oe_r = u(6, 9)
    oes = [[a.trachea_x + 4, a.spine_y - a.vb_radius - oe_r - 1, top],
           [a.cx + 8, a.spine_y - a.vb_radius - oe_r - 3, 0.0],
           [a.cx + 18, a.spine_y - a.vb_radius - oe_r - 15, a.z_dome_left - 20]]
    tubes.append((TubeSet.from_path(oes, [oe_r] * 3), "muscle"))
    return tubes


def pulmonary_artery_tubes(a: Anatomy) -> List[Tuple[TubeSet, str]]:
    """Pulmonary trunk from the heart and its two branches to the hila."""
    hc, r_pa, top = a.heart_center, a.pa_radius, a.pa_trunk_top
    trunk = _spline([[hc[0] + 5, hc[1] - 20, hc[2] + 15], top], 4)
    tubes = [(TubeSet.from_path(trunk, np.full(len(trunk), r_pa)), "blood_pulmonary")]
    for hil in (a.hilum_right, a.hilum_left):
        end = hil + PA_END_OFFSET
        mid = 0.5 * (top + end) + np.array([0.0, -4.0 if hil[0] > a.cx else 6.0, 4.0])
        path = _spline([top, mid, end], 4)
        tubes.append((TubeSet.from_path(path, np.linspace(r_pa * 0.8, r_pa * 0.6, len(path))), "blood_pulmonary"))
    return tubes


def ellipsoid_section(center, m: np.ndarray, z: float):
    """Cross-section of ellipsoid (x-c)^T m (x-c) <= 1 with the plane z: (cx, cy, ax, ay, angle) or None."""
    dz = z - center[2]
    m2 = m[:2, :2]
    v = m[:2, 2]
    inv = np.linalg.inv(m2)
    off = -dz * inv @ v
    k = 1.0 - dz * dz * (m[2, 2] - v @ inv @ v)
    if k <= 1e-6:
        return None
    w, vec = np.linalg.eigh(m2 / k)
    ax, ay = 1.0 / np.sqrt(w)
    angle = float(np.arctan2(vec[1, 0], vec[0, 0]))
    return center[0] + off[0], center[1] + off[1], ax, ay, angle


class AnatomyPlane:
    """Draws the anatomy on one plane grid (columns ``xs``, rows ``ys``, mm)."""

    def __init__(self, anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray, soft: float,
                 textures: Optional[Dict[str, SmoothField]] = None):
        self.a = anatomy
        self.xs = np.asarray(xs, np.float32)
        self.ys = np.asarray(ys, np.float32)
        self.soft = float(soft)
        self.polar = PolarFrame(self.xs, self.ys, anatomy.cx, anatomy.cy)
        self.textures = textures or {}
        self.X = np.broadcast_to(self.xs[None, :], self.polar.rho.shape)
        self.Y = np.broadcast_to(self.ys[:, None], self.polar.rho.shape)
        self._table = None
        self._tex_cache = {}

    # -- masks -----------------------------------------------------------------------
    def lung_occupancy(self, z: float, cavity: Optional[np.ndarray] = None) -> np.ndarray:
        """Occupancy of both lungs on the plane at z."""
        a = self.a
        if z > a.z_apex + 2 or z < a.z_recess - 2:
            return np.zeros(self.polar.rho.shape, np.float32)
        if cavity is None:
            cavity = self.polar.occupancy(a.cavity_table(z), self.soft)
        lung = cavity - self.mediastinum_occupancy(z)
        np.clip(lung, 0, 1, out=lung)
        lung *= soft_step(z - a.diaphragm_z(self.X, self.Y), self.soft)
        lung *= self._apex_occupancy(z)
        return lung

    def _apex_occupancy(self, z: float) -> np.ndarray:
        a = self.a
        z0 = a.z_apex - 90.0
        if z <= z0:
            return np.float32(1.0)
        e = np.sqrt(max(0.0, 1.0 - ((z - z0) / (a.z_apex - z0)) ** 2))
        out = np.zeros(self.polar.rho.shape, np.float32)
        s = a.inlet_scale(z0)
        half_w = 0.5 * (a.cav_a * s - a.med_half_back)
        for side in (-1, 1):
            xc = a.med_x + side * (a.med_half_back + half_w)
            ellipse_occupancy(self.xs, self.ys, xc, a.cy + 0.25 * a.cav_b_back, (half_w + 20) * e,
                              (0.5 * (a.cav_b_front + a.cav_b_back) + 10) * e, self.soft, out=out)
        return out

    def mediastinum_occupancy(self, z: float) -> np.ndarray:
        """Everything between the lungs: central band, heart, great vessels, spine."""
        a = self.a
        front = a.cy - a.cav_b_front
        t = np.clip((self.ys - front) / max(a.trachea_y - a.trachea_r - front, 1.0), 0, 1)
        half = a.med_half_front + (a.med_half_back - a.med_half_front) * smoothstep(t)
        # wider at the thoracic inlet (great vessels, thymus)
        half = half + 5.0 * smoothstep((z - 35.0) / 40.0)
        med = soft_step(half[:, None] - np.abs(self.xs[None, :] - a.med_x), self.soft)
        sec = ellipsoid_section(a.heart_center, a.heart_matrix(a.heart_fat_mm + 2.0), z)
        if sec is not None:
            ellipse_occupancy(self.xs, self.ys, sec[0], sec[1], sec[2], sec[3], self.soft, sec[4], out=med)
        ellipse_occupancy(self.xs, self.ys, a.cx, a.spine_y + 8, a.vb_radius + 12, a.vb_radius + 18, self.soft, out=med)
        buf = med[None]
        zs = np.array([z], np.float32)
        for tubes, _ in a.great_vessels:
            tubes.scaled(1.0, 3.0).render(buf, self.xs, self.ys, zs, self.soft)
        return med

    # -- full rendering --------------------------------------------------------------
    def table_hu(self) -> np.ndarray:
        """The scanner table and the air around the patient (z-invariant), cached."""
        if self._table is None:
            a = self.a
            hu = np.full(self.polar.rho.shape, AIR_HU, np.float32)
            back = a.cy + a.body_b_back + a.table_gap
            dx = self.X - a.cx
            top = back + a.table_curve * dx * dx
            depth = self.Y - top
            inside = soft_step(235.0 - np.abs(dx), self.soft)
            if a.table_pad > 0:
                pad = soft_step(np.minimum(depth, a.table_pad - depth), self.soft) * soft_step(200.0 - np.abs(dx), 8.0)
                hu += pad * np.float32(-720.0 - AIR_HU)  # foam mattress
            shell_top = depth - a.table_pad
            core = soft_step(np.minimum(shell_top, a.table_thickness - shell_top), self.soft) * inside
            hu = hu * (1 - core) + core * np.float32(-900.0)
            for off in (0.0, a.table_thickness - 2.5):
                s = soft_step(np.minimum(shell_top - off, off + 2.5 - shell_top), self.soft) * inside
                hu = hu * (1 - s) + s * np.float32(260.0)
            self._table = hu
        return self._table

    def _tex(self, name: str, z: float, scale: float) -> np.ndarray:
        field = self.textures.get(name)
        if field is None:
            return np.float32(0.0)
        key = (name, z)
        plane = self._tex_cache.get(key)
        if plane is None:
            if len(self._tex_cache) > 16:
                self._tex_cache.clear()
            plane = self._tex_cache[key] = field.plane(z, self.xs, self.ys)
        return plane * np.float32(scale)

    def render(self, z: float) -> Tuple[np.ndarray, np.ndarray]:
        """HU of the plane at z (float32) without vessels, ribs or nodules, and the body's occupancy."""
        a, t = self.a, self.a.tissues
        soft = self.soft
        hu = self.table_hu().copy()
        body_r = self.polar.radius(a.body_table(z))
        rho = self.polar.rho
        body = soft_step(body_r - rho, soft)
        _blend(hu, body, t.fat + self._tex("soft", z, 6.0))
        if a.breast_mm > 0:
            gland = np.clip(self._tex("gland", z, 0.8) - 0.1, 0, 1) * soft_step(body_r - rho - 8.0, soft)
            gland *= np.clip((self.polar.radius(a.fat_table(z)) - a.fat_mm * 2.5) / 10.0, 0, 1)
            _blend(hu, gland, np.float32(t.muscle - 15.0))
        muscle = soft_step(body_r - self.polar.radius(a.fat_table(z)) - rho, soft)
        _blend(hu, muscle, t.muscle + self._tex("soft", z, 8.0))
        self._scapulae(hu, z)
        cav_table = a.cavity_table(z)
        cavity = self.polar.occupancy(cav_table, soft)
        # mediastinal fat; above the lungs, the soft tissues of the neck base
        neck = np.float32(smoothstep((z - a.z_apex + 15.0) / 35.0))
        fill = np.float32(t.fat + 15.0) + neck * np.float32(t.muscle - t.fat - 25.0)
        _blend(hu, cavity, fill + self._tex("soft", z, 10.0 + 15.0 * neck))
        self._abdomen(hu, z, cavity)
        self._sternum(hu, z, cav_table)
        self._heart(hu, z)
        self._mediastinal_tubes(hu, z)
        self._trachea(hu, z)
        paraspinal = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, a.cx, a.spine_y + 8, a.vb_radius + 11, a.vb_radius + 17, soft, out=paraspinal)
        paraspinal *= soft_step(self.ys - a.spine_y, 4.0)[:, None]
        _blend(hu, paraspinal, t.muscle + self._tex("soft", z, 8.0))
        self._spine(hu, z)
        lung = self.lung_occupancy(z, cavity)
        if lung.any():
            _blend(hu, lung, self._lung_hu(z))
        return hu, body

    def _lung_hu(self, z: float) -> np.ndarray:
        a, t = self.a, self.a.tissues
        depth = (self.ys - (a.cy - a.cav_b_front)) / (a.cav_b_front + a.cav_b_back)
        base = np.float32(t.lung) + np.float32(t.lung_gradient) * np.clip(depth, 0, 1)[:, None]
        lung = base + self._tex("lung_coarse", z, t.lung_texture) + self._tex("lung_fine", z, t.lung_texture * 0.7)
        if a.emphysema > 0:
            holes = np.clip(self._tex("lung_holes", z, 1.0) - (1.6 - a.emphysema), 0, 1)
            upper = np.float32(smoothstep((z - a.z_dome_right) / 120.0))
            lung = lung + holes * upper * np.float32(-180.0 * a.emphysema) * 2.0
        if a.dependent_density:
            back = a.cy + a.cav_b_back
            band = soft_step(self.ys - (back - 10.0), 6.0)[:, None]
            patchy = np.clip(self._tex("lung_coarse", z + 40.0, 0.8), 0, 1)
            low = np.float32(smoothstep((a.z_dome_right + 80.0 - z) / 80.0))
            lung = lung + band * patchy * low * (np.float32(a.dependent_density) - base)
        return np.maximum(lung, np.float32(-1000.0))

    def _scapulae(self, hu, z):
        a, t = self.a, self.a.tissues
        top, bottom = a.z_apex + 25.0, a.z_apex - 150.0
        if not (bottom < z < top):
            return
        frac = (z - bottom) / (top - bottom)
        width = 0.15 + 0.35 * np.sqrt(frac)
        th = table_angles()
        inner = a.cavity_table(z) + 16.0 + 6.0 * frac
        # an angular window on each side of the spine: shrink the band to nothing outside it
        ang = np.zeros_like(th)
        for centre in (np.pi / 2 + 0.75, np.pi / 2 - 0.75):
            ang = np.maximum(ang, np.clip((width - np.abs(_angle_diff(th, centre))) * 40.0, 0, 1))
        thick = 4.0 * ang
        rad = self.polar.radius(inner)
        band = soft_step(np.minimum(self.polar.rho - rad, self.polar.radius(inner + thick) - self.polar.rho), self.soft)
        band *= self.polar.radius(ang) > 0.01
        _blend(hu, band, np.float32(0.7 * t.cortex))

    def _abdomen(self, hu, z, cavity):
        a, t = self.a, self.a.tissues
        if z > max(a.z_dome_right, a.z_dome_left) + 2:
            return
        below = soft_step(a.diaphragm_z(self.X, self.Y) - z, self.soft) * cavity
        liver_edge = a.cx + 0.15 * a.cav_a - 0.6 * (self.ys[:, None] - a.cy)
        liver = soft_step(liver_edge - self.xs[None, :], 3.0) * below
        _blend(hu, liver, np.float32(t.liver) + self._tex("soft", z, 5.0))
        left = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, a.cx + 0.55 * a.cav_a, a.cy + 0.45 * a.cav_b_back,
                          0.28 * a.cav_a, 0.35 * a.cav_b_back, self.soft, 0.6, out=left)
        _blend(hu, left * below, np.float32(t.spleen))
        stomach = np.zeros_like(hu)
        sx, sy = a.cx + 0.38 * a.cav_a, a.cy - 0.1 * a.cav_b_front
        sa, sb = 0.24 * a.cav_a, 0.3 * a.cav_b_front
        ellipse_occupancy(self.xs, self.ys, sx, sy, sa, sb, self.soft, 0.4, out=stomach)
        stomach *= soft_step(a.z_dome_left - 8.0 - z, self.soft) * below
        _blend(hu, stomach, np.float32(t.muscle))
        inner = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, sx, sy, sa - 4, sb - 4, self.soft, 0.4, out=inner)
        inner *= stomach
        _blend(hu, inner, np.float32(t.stomach))
        if a.stomach_gas > 0:
            # gas floats to the front (supine patient): a fluid level at constant y
            gas = soft_step((sy - sb * (1.0 - a.stomach_gas)) - self.ys, self.soft)[:, None]
            _blend(hu, inner * gas, np.float32(AIR_HU + 20.0))

    def _sternum(self, hu, z, cav_table):
        a, t = self.a, self.a.tissues
        if not (a.z_dome_right < z < a.z_apex - 5):
            return
        front = a.cy - cav_table[int(len(cav_table) * 0.25)]  # radius at -90 degrees
        half_w = 11.0 + 9.0 * smoothstep((z - (a.z_apex - 60)) / 40.0)
        out = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, a.cx, front - 6.0, half_w, 6.0, self.soft, out=out)
        _blend(hu, out, np.float32(t.cortex))
        inner = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, a.cx, front - 6.0, half_w - 1.5, 4.5, self.soft, out=inner)
        _blend(hu, inner, np.float32(t.trabecular) + self._tex("marrow", z, 40.0))

    def _heart(self, hu, z):
        a, t = self.a, self.a.tissues
        fat_sec = ellipsoid_section(a.heart_center, a.heart_matrix(a.heart_fat_mm), z)
        if fat_sec is None:
            return
        below = soft_step(z - a.diaphragm_z(self.X, self.Y) + 6.0, self.soft)
        occ = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, *fat_sec[:4], self.soft, fat_sec[4], out=occ)
        _blend(hu, occ * below, np.float32(t.fat) + self._tex("soft", z, 6.0))
        for grow, value in ((0.0, t.myocardium), (-9.0, t.blood_vein)):
            sec = ellipsoid_section(a.heart_center, a.heart_matrix(grow), z)
            if sec is None:
                continue
            occ = np.zeros_like(hu)
            ellipse_occupancy(self.xs, self.ys, *sec[:4], self.soft, sec[4], out=occ)
            _blend(hu, occ * below, np.float32(value))

    def _mediastinal_tubes(self, hu, z):
        t = self.a.tissues
        zs = np.array([z], np.float32)
        for tubes, tissue in self.a.great_vessels:
            occ = np.zeros((1,) + hu.shape, np.float32)
            tubes.render(occ, self.xs, self.ys, zs, self.soft)
            if occ.any():
                _blend(hu, occ[0], np.float32(getattr(t, tissue)))

    def _trachea(self, hu, z):
        a, t = self.a, self.a.tissues
        if z < 0:
            return
        for r, value in ((a.trachea_r + a.trachea_wall, t.airway_wall), (a.trachea_r, AIR_HU + 15.0)):
            occ = np.zeros_like(hu)
            y = a.trachea_y - 0.06 * z  # runs slightly forward as it rises
            ellipse_occupancy(self.xs, self.ys, a.trachea_x, y, r, r * 0.92, self.soft, out=occ)
            _blend(hu, occ, np.float32(value))

    def _spine(self, hu, z):
        a, t = self.a, self.a.tissues
        soft = self.soft
        phase = ((z - a.vert_phase) % a.vert_period) / a.vert_period
        disc = phase < a.disc_mm / a.vert_period
        r = a.vb_radius * (1.0 + 0.0015 * (a.z_apex - z))
        vy = a.spine_y
        occ = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, a.cx, vy, r, r * 0.88, soft, out=occ)
        if disc:
            _blend(hu, occ, np.float32(t.disc))
        else:
            _blend(hu, occ, np.float32(t.cortex))
            occ = np.zeros_like(hu)
            ellipse_occupancy(self.xs, self.ys, a.cx, vy, r - 1.8, r * 0.88 - 1.8, soft, out=occ)
            _blend(hu, occ, np.float32(t.trabecular) + self._tex("marrow", z, 45.0))
        # posterior arch, canal, spinous and transverse processes
        canal_y = vy + r * 0.88 + 9.0
        zs = np.array([z], np.float32)
        bone = np.zeros((1,) + hu.shape, np.float32)
        ring = TubeSet.from_path(
            [[a.cx + 6 * np.cos(q), canal_y + 7 * np.sin(q), z] for q in np.linspace(0, 2 * np.pi, 13)],
            [3.2] * 13,
        )
        ring.render(bone, self.xs, self.ys, zs, soft)
        if 0.25 < phase < 0.85:
            s = TubeSet(
                [[a.cx, canal_y + 8, z], [a.cx - 6, canal_y - 2, z], [a.cx + 6, canal_y - 2, z]],
                [[a.cx, canal_y + 30, z], [a.cx - 30, canal_y + 6, z], [a.cx + 30, canal_y + 6, z]],
                [3.5, 4.0, 4.0], [2.5, 4.5, 4.5],
            )
            s.render(bone, self.xs, self.ys, zs, soft)
        _blend(hu, bone[0], np.float32(0.75 * t.cortex))
        occ = np.zeros_like(hu)
        ellipse_occupancy(self.xs, self.ys, a.cx, canal_y, 6.5, 7.5, soft, out=occ)
        _blend(hu, occ, np.float32(t.csf + 10.0))


def _blend(hu: np.ndarray, occ, value) -> None:
    """In place: hu = hu * (1 - occ) + value * occ."""
    hu += occ * (value - hu)
