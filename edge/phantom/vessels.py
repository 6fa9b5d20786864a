"""Branching trees in the lungs: bronchi with their arteries, and the veins.

Trees are grown by recursive space division (after Kitaoka et al., J Appl
Physiol 1999): each branch supplies a set of points sampled in the lung; at
its end the set is split in two across its principal axis and each half gets
a child heading for the half's centroid. Radii follow the flow split
(``r_child = r * share ** (1 / 2.8)``), so vessels taper towards the pleura
and branch at every angle, and a vessel cut across is a round blob on a slice.

Pulmonary arteries run beside the bronchi (bronchovascular bundles); the
veins form a second, independent tree that drains to the left atrium.
"""

from dataclasses import dataclass

import numpy as np

from edge.phantom.anatomy import PA_END_OFFSET, Anatomy
from edge.phantom.lungmap import LungMap
from edge.phantom.shapes import TubeSet

MURRAY_EXPONENT = 2.8
MAX_BRANCH_ANGLE = np.deg2rad(75.0)
AIRWAY_SCALE = 0.75  # bronchial lumen radius / tree radius (the artery's)
HILAR_RADIUS = 3.0  # mm; thicker branches may leave the lung (hilum, mediastinum)


@dataclass
class LungTrees:
    """Tube sets of one patient's lung vessels and airways."""

    arteries: TubeSet
    veins: TubeSet
    airway_wall: TubeSet  # outer surface of the bronchial wall
    airway_lumen: TubeSet

    @property
    def vessels(self) -> TubeSet:
        return TubeSet.concat([self.arteries, self.veins])


@dataclass
class _Tree:
    start: np.ndarray  # (N, 3)
    end: np.ndarray
    radius: np.ndarray  # (N,) radius at the segment's end
    parent: np.ndarray  # (N,) index of parent segment, -1 for the root


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _group_mean(key: np.ndarray, values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per-group mean of (N, 3) values for integer group keys 0..len(count)-1."""
    n = len(count)
    return np.stack([np.bincount(key, values[:, c], minlength=n) for c in range(3)], axis=1) / np.maximum(
        count, 1)[:, None]


def grow_tree(rng: np.random.Generator, points: np.ndarray, root_start, root_end, root_radius: float,
              stop_radius: float, lung: LungMap) -> _Tree:
    """Grow one tree from a root segment into the region sampled by ``points``.

    All branches of one generation are split together (vectorised over nodes).
    """
    starts = [np.asarray(root_start, float)[None]]
    ends = [np.asarray(root_end, float)[None]]
    radii = [np.array([root_radius])]
    parents = [np.array([-1])]
    n_seg = 1
    # active nodes: segment id, end point, direction, radius; points labelled by active node
    seg_id = np.array([0])
    node_end = ends[0].copy()
    node_dir = _normalise(ends[0] - starts[0])
    node_r = np.array([root_radius])
    label = np.zeros(len(points), int)
    cos_max = np.cos(MAX_BRANCH_ANGLE)
    while len(seg_id):
        k_active = len(seg_id)
        live = label >= 0
        lab = label[live]
        pts = points[live]
        count = np.bincount(lab, minlength=k_active).astype(float)
        centre = _group_mean(lab, pts, count)
        terminal = (node_r < stop_radius * 1.3) | (count < 4)
        # terminal branches: one last twig towards the centroid of what is left
        t_idx = np.flatnonzero(terminal & (count > 0))
        if len(t_idx):
            v = centre[t_idx] - node_end[t_idx]
            dist = np.linalg.norm(v, axis=1)
            ok = dist > 1.0
            t_idx, v, dist = t_idx[ok], v[ok], dist[ok]
            length = dist * rng.uniform(0.8, 1.3, len(t_idx))
            new = _add_children(node_end[t_idx], node_dir[t_idx], v / dist[:, None], length,
                                node_r[t_idx] * 0.75, np.ones(len(t_idx)), lung, cos_max)
            keep = new[0]
            if keep.any():
                starts.append(node_end[t_idx][keep])
                ends.append(new[1][keep])
                radii.append(node_r[t_idx][keep] * 0.75)
                parents.append(seg_id[t_idx][keep])
                n_seg += int(keep.sum())
        # split the others across the principal axis perpendicular to the parent direction
        q = pts - centre[lab]
        d = node_dir[lab]
        qp = q - (q * d).sum(1, keepdims=True) * d
        cov = np.zeros((k_active, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(lab, qp[:, i] * qp[:, j], minlength=k_active)
        cov += np.eye(3) * 1e-6
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        other = _normalise(np.cross(node_dir, axis))
        ang = rng.normal(0.0, 0.35, k_active)[:, None]
        axis = np.cos(ang) * axis + np.sin(ang) * other
        proj = (q * axis[lab]).sum(1)
        spread = np.sqrt(np.bincount(lab, proj * proj, minlength=k_active) / np.maximum(count, 1))
        cut = rng.normal(0.0, 0.25, k_active) * spread
        child_key = 2 * lab + (proj >= cut[lab])
        c_count = np.bincount(child_key, minlength=2 * k_active).astype(float)
        c_centre = _group_mean(child_key, pts, c_count)
        parent = np.arange(2 * k_active) // 2
        cand = (c_count > 0) & ~terminal[parent]
        share = c_count / np.maximum(count[parent], 1)
        rc = node_r[parent] * share ** (1.0 / MURRAY_EXPONENT)
        v = c_centre - node_end[parent]
        dist = np.linalg.norm(v, axis=1)
        cand &= dist > 1e-6
        length = np.clip(dist * rng.uniform(0.35, 0.65, len(dist)), 2.5 * rc, 14.0 * rc + 4.0)
        ci = np.flatnonzero(cand)
        ok, end_pts = _add_children(node_end[parent[ci]], node_dir[parent[ci]], v[ci] / dist[ci, None],
                                    length[ci], rc[ci], 1.5 * rc[ci], lung, cos_max)
        ci, end_pts = ci[ok], end_pts[ok]
        # new segments and the next generation
        new_ids = n_seg + np.arange(len(ci))
        starts.append(node_end[parent[ci]])
        ends.append(end_pts)
        radii.append(rc[ci])
        parents.append(seg_id[parent[ci]])
        n_seg += len(ci)
        remap = np.full(2 * k_active, -1)
        remap[ci] = np.arange(len(ci))
        new_label = np.full(len(points), -1)
        new_label[live] = remap[child_key]
        label = new_label
        seg_id = new_ids
        node_dir = _normalise(end_pts - node_end[parent[ci]])
        node_end = end_pts
        node_r = rc[ci]
    return _Tree(np.concatenate(starts), np.concatenate(ends), np.concatenate(radii), np.concatenate(parents))


def _add_children(node, d, direction, length, radius, min_len, lung: LungMap, cos_max):
    """End points of child branches; (ok mask, ends). Children turning back are pulled forward;
    small ones leaving the lung are shortened (up to 3 times) or dropped."""
    cosang = (direction * d).sum(1)
    back = cosang < cos_max
    if back.any():
        perp = _normalise(direction[back] - cosang[back, None] * d[back])
        direction = direction.copy()
        direction[back] = cos_max * d[back] + np.sin(MAX_BRANCH_ANGLE) * perp
    length = length.copy()
    # hilar branches may run in the mediastinum; smaller ones stay in the lung
    ok = radius > HILAR_RADIUS
    for _ in range(4):
        end = node + direction * length[:, None]
        ok = ok | lung.contains(end)
        if ok.all():
            break
        length = np.where(ok, length, length * 0.6)
    end = node + direction * length[:, None]
    return ok & (length >= min_len), end


def _tubes(tree: _Tree, offset: np.ndarray, radius_scale: float, keep: np.ndarray, rng) -> TubeSet:
    """Tube set of a tree's segments, each node shifted by ``offset`` (per segment end), slightly bent."""
    p1 = tree.end + offset
    p0 = np.where(tree.parent[:, None] >= 0, p1[np.maximum(tree.parent, 0)], tree.start + offset[0])
    r1 = tree.radius * radius_scale
    r0 = np.where(tree.parent >= 0, np.minimum(tree.radius[np.maximum(tree.parent, 0)], tree.radius * 1.1),
                  tree.radius) * radius_scale
    p0, p1, r0, r1 = p0[keep], p1[keep], r0[keep], r1[keep]
    # bend long segments: two capsules through a displaced midpoint
    length = np.linalg.norm(p1 - p0, axis=1)
    bend = length > 6.0
    mid = 0.5 * (p0 + p1) + rng.normal(0.0, 1.0, p0.shape) * (0.05 * length)[:, None]
    rm = 0.5 * (r0 + r1)
    a0 = np.concatenate([p0[~bend], p0[bend], mid[bend]])
    a1 = np.concatenate([p1[~bend], mid[bend], p1[bend]])
    b0 = np.concatenate([r0[~bend], r0[bend], rm[bend]])
    b1 = np.concatenate([r1[~bend], rm[bend], r1[bend]])
    return TubeSet(a0, a1, b0, b1)


def _bundle_offsets(tree: _Tree, gap: float) -> np.ndarray:
    """Per-segment-end offsets putting an artery beside its bronchus."""
    d = tree.end - tree.start
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    ref = np.array([0.3, -0.8, 0.5])
    ref /= np.linalg.norm(ref)
    side = np.cross(d, ref)
    weak = np.linalg.norm(side, axis=1) < 0.3
    side[weak] = np.cross(d[weak], np.array([1.0, 0.0, 0.0]))
    side /= np.linalg.norm(side, axis=1, keepdims=True) + 1e-9
    return side * ((1.0 + 1.2 * AIRWAY_SCALE) * tree.radius + gap)[:, None]


def place_hila(anatomy: Anatomy, lung: LungMap) -> None:
    """Move each hilum to the medial edge of its lung, near where the anatomy put it."""
    moved = []
    for side, hilum in ((-1, anatomy.hilum_right), (1, anatomy.hilum_left)):
        right = (lung.xs < lung.side_x)[None, None, :]
        mask = lung.lung & (lung.depth >= 4.0) & (right if side < 0 else ~right)
        zok = np.abs(lung.zs - hilum[2]) <= 15.0
        pts = lung.voxel_centres(mask & zok[:, None, None])
        if len(pts) == 0:
            moved.append(hilum)
            continue
        d = np.linalg.norm((pts - hilum) * np.array([1.0, 1.0, 2.0]), axis=1)
        moved.append(pts[int(np.argmin(d))])
    anatomy.set_hila(moved[0], moved[1])


def build_lung_trees(anatomy: Anatomy, lung: LungMap, rng: np.random.Generator,
                     stop_radius: float = 0.55, points_per_lung: int = 20000) -> LungTrees:
    """Bronchi, arteries and veins of both lungs, from the carina, hila and left atrium."""
    a = anatomy
    arteries, veins, walls, lumens = [], [], [], []
    for side, hilum in ((-1, a.hilum_right), (1, a.hilum_left)):
        pts = lung.sample(rng, points_per_lung, side)
        if len(pts) < 50:
            continue
        r_main = rng.uniform(9.5, 11.5)
        bronchi = grow_tree(rng, pts, a.carina, hilum, r_main, stop_radius, lung)
        offs = _bundle_offsets(bronchi, 0.6)
        art_scale = rng.uniform(0.95, 1.1)
        not_root = bronchi.parent >= 0
        arteries.append(_tubes(bronchi, offs, art_scale, not_root, rng))
        # join the mediastinal pulmonary artery (anatomy.mediastinal_tubes) to the tree
        r_join = r_main * art_scale
        arteries.append(TubeSet([hilum + PA_END_OFFSET], [hilum + offs[0]], [r_join], [r_join]))
        # airways while the lumen is resolvable, and only inside the lung (plus the main bronchus)
        big = bronchi.radius * AIRWAY_SCALE >= max(1.1, 1.6 * stop_radius)
        big &= lung.contains(bronchi.end) | (bronchi.parent < 0)
        zero = np.zeros_like(offs)
        lumen = _tubes(bronchi, zero, AIRWAY_SCALE, big, np.random.default_rng(0))
        wall = lumen.scaled(1.0, 0.0)
        wall.r0 = wall.r0 + np.maximum(0.45, 0.18 * wall.r0)
        wall.r1 = wall.r1 + np.maximum(0.45, 0.18 * wall.r1)
        lumens.append(lumen)
        walls.append(TubeSet(wall.p0, wall.p1, wall.r0, wall.r1))
        # veins: an independent tree from the left atrium
        vpts = lung.sample(rng, points_per_lung, side)
        v_root_end = np.array([hilum[0] + side * rng.uniform(0, 8), hilum[1] + rng.uniform(5, 20),
                               a.atrium[2] + rng.uniform(-10, 10)])
        vtree = grow_tree(rng, vpts, a.atrium, v_root_end, rng.uniform(9.0, 11.0), stop_radius, lung)
        veins.append(_tubes(vtree, np.zeros((len(vtree.radius), 3)), 1.0, np.ones(len(vtree.radius), bool), rng))
    return LungTrees(TubeSet.concat(arteries), TubeSet.concat(veins), TubeSet.concat(walls),
                     TubeSet.concat(lumens))
