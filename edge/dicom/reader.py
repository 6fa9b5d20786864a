"""Read one DICOM CT instance into :class:`~edge.frame.CTFrame` objects, one per frame.

Every failure is a :class:`~edge.errors.DicomError` (or its subclass
:class:`~edge.errors.UnsupportedTransferSyntaxError`) whose message names the
file and the reason. Defaults applied to incomplete files are recorded in
``CTFrame.notes`` and logged as one warning per file, without patient data.
"""

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from edge.dicom.modality import MISSING_MODALITY_NOTE, not_ct_reason
from edge.dicom.multiframe import FrameAttributeSources, frame_attribute_sources
from edge.dicom.pixel_format import PixelFormat, read_pixel_format
from edge.dicom.pixels import decode_stored_frames, resolve_transfer_syntax
from edge.dicom.source import open_dataset
from edge.dicom.values import (
    describe,
    element_value,
    float_tuple,
    optional_float,
    optional_int,
    optional_str,
    string_tuple,
)
from edge.errors import DicomError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry

logger = logging.getLogger(__name__)

# ImageOrientationPatient direction cosines must be unit length and orthogonal within this.
ORIENTATION_TOLERANCE = 0.01


@dataclass(frozen=True)
class DicomHeader:
    """What is needed to group a folder by series, read without pixel data.

    Lenient: missing or malformed attributes become "" / None rather than errors,
    so one odd file does not stop a folder scan; :func:`read_frames` is the strict check.
    ``slice_location`` is the first frame's position along its slice normal in mm
    (as :attr:`SliceGeometry.slice_location`), None without usable geometry.
    """

    source: Optional[str]
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    instance_number: Optional[int]
    slice_location: Optional[float]
    is_localizer: bool
    n_frames: int

    @property
    def is_ct(self) -> bool:
        """True when :func:`read_frames` accepts the object as CT (same rule)."""
        return not_ct_reason(self.modality, self.sop_class_uid) is None

    @property
    def series_key(self) -> Tuple[str, str]:
        """(StudyInstanceUID, SeriesInstanceUID)."""
        return self.study_uid, self.series_uid


def read_frames(source, *, stop_before_pixels: bool = False) -> List[CTFrame]:
    """All frames of one CT instance from a path, a binary file-like or a pydicom Dataset.

    With ``stop_before_pixels`` the pixel data is neither read nor decoded and each
    frame's ``pixels`` is an empty (0, 0) array of the nominal dtype; geometry,
    rescale, padding and UIDs are filled in as usual.
    """
    opened = open_dataset(source, stop_before_pixels=stop_before_pixels)
    ds, label = opened.dataset, opened.source
    notes = list(opened.notes)

    modality = optional_str(ds, "Modality", label)
    reason = not_ct_reason(modality, _sop_class_uid(ds, label))
    if reason is not None:
        raise DicomError(label, reason)
    if not modality:
        notes.append(MISSING_MODALITY_NOTE)
    if element_value(ds, "ModalityLUTSequence", label) is not None:
        raise DicomError(
            label, "ModalityLUTSequence (a lookup-table modality LUT) is not supported; CT needs RescaleSlope/Intercept"
        )

    study_uid = _required_uid(ds, "StudyInstanceUID", label)
    series_uid = _required_uid(ds, "SeriesInstanceUID", label)
    sop_uid = _required_uid(ds, "SOPInstanceUID", label)
    fmt = read_pixel_format(ds, label)
    notes.extend(fmt.notes)
    sources = frame_attribute_sources(ds, fmt.n_frames, label)
    image_type = string_tuple(ds, "ImageType", label)
    instance_number = _lenient_int(ds, "InstanceNumber", label)
    # Per-frame attributes are checked before the (costlier) pixel decoding.
    per_frame = []
    for frame_sources in sources:
        geometry, geometry_notes = _frame_geometry(frame_sources, fmt, label)
        slope, intercept, rescale_notes = _frame_rescale(frame_sources, label)
        frame_type = image_type
        if frame_sources.frame_type is not None:
            frame_type = string_tuple(frame_sources.frame_type, "FrameType", label) or image_type
        per_frame.append((geometry, slope, intercept, frame_type, geometry_notes + rescale_notes))

    if stop_before_pixels:
        stored = None
    else:
        transfer_syntax, ts_notes = resolve_transfer_syntax(ds, label)
        notes.extend(ts_notes)
        stored = decode_stored_frames(ds, fmt, transfer_syntax, label)

    frames = []
    for index, (geometry, slope, intercept, frame_type, frame_notes) in enumerate(per_frame):
        frames.append(
            CTFrame(
                pixels=stored[index] if stored is not None else np.empty((0, 0), fmt.nominal_dtype),
                rescale_slope=slope,
                rescale_intercept=intercept,
                geometry=geometry,
                padding=fmt.padding,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=sop_uid,
                instance_number=instance_number,
                frame_index=index,
                image_type=frame_type,
                photometric=fmt.photometric,
                is_localizer=_is_localizer(frame_type) or _is_localizer(image_type),
                source=label,
                notes=tuple(notes) + frame_notes,
            )
        )
    _log_notes(label, frames)
    return frames


def read_frame(source) -> CTFrame:
    """The single frame of a single-frame CT instance; DicomError when it holds another count."""
    frames = read_frames(source)
    if len(frames) != 1:
        raise DicomError(frames[0].source, f"expected one frame, the instance has {len(frames)}")
    return frames[0]


def read_header(source) -> DicomHeader:
    """Grouping attributes of one file, parsed without pixel data; DicomError only when it is not DICOM."""
    opened = open_dataset(source, stop_before_pixels=True)
    ds, label = opened.dataset, opened.source

    def text(keyword):
        return _lenient(lambda: optional_str(ds, keyword, label), "")

    n_frames = _lenient(lambda: optional_int(ds, "NumberOfFrames", label), None) or 1
    image_type = _lenient(lambda: string_tuple(ds, "ImageType", label), ())
    first = _lenient(lambda: frame_attribute_sources(ds, max(n_frames, 1), label)[0], None)
    slice_location, frame_type = None, ()
    if first is not None:
        slice_location = _lenient(lambda: _slice_location(first, label), None)
        if first.frame_type is not None:
            frame_type = _lenient(lambda: string_tuple(first.frame_type, "FrameType", label), ())
    return DicomHeader(
        source=label,
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_uid=text("SOPInstanceUID"),
        sop_class_uid=_lenient(lambda: _sop_class_uid(ds, label), ""),
        modality=text("Modality"),
        instance_number=_lenient_int(ds, "InstanceNumber", label),
        slice_location=slice_location,
        is_localizer=_is_localizer(image_type) or _is_localizer(frame_type),
        n_frames=n_frames,
    )


def _frame_geometry(sources: FrameAttributeSources, fmt: PixelFormat, label) -> Tuple[SliceGeometry, Tuple[str, ...]]:
    where = f"{sources.origin}: " if sources.origin else ""
    why = ": geometry is required to place findings in patient coordinates"
    position = float_tuple(sources.position, "ImagePositionPatient", 3, label)
    if position is None:
        raise DicomError(label, f"{where}missing {describe('ImagePositionPatient')}{why}")
    orientation = float_tuple(sources.orientation, "ImageOrientationPatient", 6, label)
    if orientation is None:
        raise DicomError(label, f"{where}missing {describe('ImageOrientationPatient')}{why}")
    spacing = float_tuple(sources.measures, "PixelSpacing", 2, label)
    if spacing is None:
        raise DicomError(label, f"{where}missing {describe('PixelSpacing')}{why}")
    if min(spacing) <= 0:
        raise DicomError(label, f"{where}PixelSpacing {spacing} is not positive")
    row_direction, column_direction = _unit_directions(orientation, where, label)
    notes = ()
    thickness = optional_float(sources.measures, "SliceThickness", label)
    if thickness is None:
        thickness = 0.0
        notes = (f"{where}SliceThickness missing; 0 recorded",)
    elif thickness < 0:
        raise DicomError(label, f"{where}SliceThickness {thickness} is negative")
    geometry = SliceGeometry(
        rows=fmt.rows,
        columns=fmt.columns,
        pixel_spacing=spacing,
        position=position,
        row_direction=row_direction,
        column_direction=column_direction,
        slice_thickness=thickness,
    )
    return geometry, notes


def _unit_directions(orientation, where: str, label):
    """Row and column direction cosines, normalised; DicomError when not (nearly) orthonormal."""
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    row_norm, column_norm = float(np.linalg.norm(row)), float(np.linalg.norm(column))
    if (
        abs(row_norm - 1) > ORIENTATION_TOLERANCE
        or abs(column_norm - 1) > ORIENTATION_TOLERANCE
        or abs(float(row @ column)) > ORIENTATION_TOLERANCE
    ):
        raise DicomError(
            label, f"{where}ImageOrientationPatient {tuple(orientation)} is not two orthogonal unit vectors"
        )
    return tuple(float(v) for v in row / row_norm), tuple(float(v) for v in column / column_norm)


def _frame_rescale(sources: FrameAttributeSources, label) -> Tuple[float, float, Tuple[str, ...]]:
    """Modality LUT (slope, intercept) of one frame; missing values default to 1 / 0 with a note."""
    where = f"{sources.origin}: " if sources.origin else ""
    slope = optional_float(sources.value_transform, "RescaleSlope", label)
    intercept = optional_float(sources.value_transform, "RescaleIntercept", label)
    notes = []
    if slope is None:
        slope = 1.0
        notes.append(f"{where}RescaleSlope missing; 1 used")
    if intercept is None:
        intercept = 0.0
        notes.append(f"{where}RescaleIntercept missing; 0 used")
    if slope == 0:
        raise DicomError(label, f"{where}RescaleSlope is 0")
    rescale_type = optional_str(sources.value_transform, "RescaleType", label)
    if rescale_type and rescale_type.upper() != "HU":
        notes.append(f"{where}RescaleType is {rescale_type}, not HU")
    return slope, intercept, tuple(notes)


def _slice_location(sources: FrameAttributeSources, label) -> Optional[float]:
    position = float_tuple(sources.position, "ImagePositionPatient", 3, label)
    orientation = float_tuple(sources.orientation, "ImageOrientationPatient", 6, label)
    if position is None or orientation is None:
        return None
    row, column = _unit_directions(orientation, "", label)
    normal = np.cross(row, column)
    location = float(np.dot(position, normal / np.linalg.norm(normal)))
    return location if math.isfinite(location) else None


def _sop_class_uid(ds, label) -> str:
    """SOPClassUID, else the file meta MediaStorageSOPClassUID, else ""."""
    value = optional_str(ds, "SOPClassUID", label)
    meta = getattr(ds, "file_meta", None)
    if not value and meta is not None:
        value = optional_str(meta, "MediaStorageSOPClassUID", label)
    return value


def _required_uid(ds, keyword: str, label) -> str:
    value = optional_str(ds, keyword, label)
    if not value:
        raise DicomError(label, f"missing {describe(keyword)}")
    return value


def _is_localizer(image_type: Tuple[str, ...]) -> bool:
    return any(value.upper() == "LOCALIZER" for value in image_type)


def _lenient_int(ds, keyword: str, label) -> Optional[int]:
    """An informational integer (InstanceNumber): None when absent or malformed."""
    return _lenient(lambda: optional_int(ds, keyword, label), None)


def _lenient(read, default):
    try:
        return read()
    except DicomError:
        return default


def _log_notes(label, frames: List[CTFrame]) -> None:
    """One warning per file listing the distinct defaults applied (no patient data in notes)."""
    distinct = list(dict.fromkeys(note for frame in frames for note in frame.notes))
    if distinct:
        logger.warning("%s: %s", label or "<memory>", "; ".join(distinct))
