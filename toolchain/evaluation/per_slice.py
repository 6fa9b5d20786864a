"""Per-image (per-slice) metrics for the clinical criteria: sensitivity >= 95 %, <= 1 FP per image.

Definitions (an "image" is one axial slice, identified by its z in mm):

- input: 2-D findings, one per row of a per-slice predictions file
  (``seriesuid,coordX,coordY,coordZ,probability``) whose coordZ is the z of the
  image the finding was made on, and the z of every image of each scan (a
  ``seriesuid,coordZ`` table: the image count is the FP/image divisor);
- each finding is placed on the image nearest to its coordZ; one farther than
  ``z_tolerance_mm`` from every image of its scan is an input error;
- a *lesion-slice* is a (nodule, image) pair where the image cuts the nodule
  sphere strictly inside its radius: ``(z_image - z_nodule)**2 < r**2``
  (r = diameter / 2; a negative diameter reads as 10 mm, as in LUNA16);
- a finding at or above ``threshold`` hits a nodule when its distance to the
  nodule centre, measured with the finding on its image plane, is strictly
  below r (the LUNA16 criterion in 3-D; in-plane this is "inside the nodule's
  cross-section on that image"). It then detects that lesion-slice; further
  hits on a detected lesion-slice are neither TP nor FP; a finding that hits
  no nodule is a FP on its image;
- per-slice sensitivity = detected lesion-slices / all lesion-slices;
  FP per image = FPs / images (mean over all images of all scans), with the
  worst image and the number of images over the limit reported too.

Only scans in the slice table count; nodules and findings of other scans are
ignored and counted.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional

import numpy as np

from edge.errors import InputError
from toolchain.evaluation.froc import Candidates, Nodules

SENSITIVITY_TARGET = 0.95
FP_PER_IMAGE_LIMIT = 1.0
Z_TOLERANCE_MM = 0.1


@dataclass(frozen=True)
class PerSliceMetrics:
    threshold: float
    scans: int
    images: int
    lesion_slices: int
    detected_lesion_slices: int
    sensitivity: Optional[float]  # None without lesion-slices
    false_positives: int
    fp_per_image: float
    max_fp_on_one_image: int
    images_over_fp_limit: int
    meets_criteria: bool  # sensitivity >= 95 % and mean FP/image <= 1
    ignored_nodules: int
    ignored_findings: int

    def to_dict(self) -> Dict[str, object]:
        out = asdict(self)
        out.update(sensitivity_target=SENSITIVITY_TARGET, fp_per_image_limit=FP_PER_IMAGE_LIMIT)
        return out


def per_slice_metrics(
    nodules: Nodules,
    findings: Candidates,
    slice_positions: Mapping[str, np.ndarray],
    threshold: float,
    z_tolerance_mm: float = Z_TOLERANCE_MM,
    findings_source=None,
) -> PerSliceMetrics:
    """Per-slice sensitivity and FP per image at ``threshold`` (see the module docstring)."""
    r2_all = nodules.hit_radius_squared()
    nodule_rows: Dict[str, list] = {}
    for i, uid in enumerate(nodules.seriesuids):
        nodule_rows.setdefault(uid, []).append(i)
    finding_rows: Dict[str, list] = {}
    for i, uid in enumerate(findings.seriesuids):
        finding_rows.setdefault(uid, []).append(i)

    images = lesion_slices = detected = false_positives = max_fp = over_limit = 0
    for uid, z in slice_positions.items():
        z = np.sort(np.asarray(z, float))
        images += len(z)
        rows = np.asarray(nodule_rows.get(uid, []), np.int64)
        centers, r2 = nodules.centers[rows], r2_all[rows]
        lesion_slices += int(np.sum((z[None, :] - centers[:, 2:3]) ** 2 < r2[:, None]))

        f_rows = np.asarray(finding_rows.get(uid, []), np.int64)
        f_image = _nearest_image(z, findings.centers[f_rows, 2], z_tolerance_mm, uid, findings_source)
        accepted = findings.probabilities[f_rows] >= threshold
        points = findings.centers[f_rows][accepted].copy()
        f_image = f_image[accepted]
        points[:, 2] = z[f_image]
        # hits[f, n]: finding f (on its image plane) lies inside nodule n.
        hits = np.sum((points[:, None, :] - centers[None, :, :]) ** 2, axis=2) < r2[None, :]
        detected += len({(int(n), int(f_image[f])) for f, n in zip(*np.nonzero(hits))})
        fp_images = f_image[~hits.any(axis=1)]
        false_positives += len(fp_images)
        if len(fp_images):
            per_image = np.bincount(fp_images, minlength=len(z))
            max_fp = max(max_fp, int(per_image.max()))
            over_limit += int(np.sum(per_image > FP_PER_IMAGE_LIMIT))

    sensitivity = detected / lesion_slices if lesion_slices else None
    fp_per_image = false_positives / images if images else 0.0
    return PerSliceMetrics(
        threshold=float(threshold),
        scans=len(slice_positions),
        images=images,
        lesion_slices=lesion_slices,
        detected_lesion_slices=detected,
        sensitivity=sensitivity,
        false_positives=false_positives,
        fp_per_image=fp_per_image,
        max_fp_on_one_image=max_fp,
        images_over_fp_limit=over_limit,
        meets_criteria=bool(
            sensitivity is not None and sensitivity >= SENSITIVITY_TARGET and fp_per_image <= FP_PER_IMAGE_LIMIT),
        ignored_nodules=sum(1 for u in nodules.seriesuids if u not in slice_positions),
        ignored_findings=sum(1 for u in findings.seriesuids if u not in slice_positions),
    )


def _nearest_image(z: np.ndarray, finding_z: np.ndarray, tolerance: float, uid: str, source) -> np.ndarray:
    """Index of the image nearest to each finding's z; error when none is within ``tolerance``."""
    if len(finding_z) == 0:
        return np.zeros(0, np.int64)
    if len(z) == 0:
        raise InputError(source, f"series {uid} has findings but no images in the slice table")
    right = np.clip(np.searchsorted(z, finding_z), 1, max(len(z) - 1, 1))
    left = right - 1 if len(z) > 1 else np.zeros_like(right)
    right = np.minimum(right, len(z) - 1)
    nearest = np.where(np.abs(z[left] - finding_z) <= np.abs(z[right] - finding_z), left, right)
    far = np.abs(z[nearest] - finding_z) > tolerance
    if far.any():
        bad = float(finding_z[np.argmax(far)])
        raise InputError(
            source, f"series {uid}: finding at coordZ {bad:g} mm is more than {tolerance:g} mm from every image")
    return nearest
