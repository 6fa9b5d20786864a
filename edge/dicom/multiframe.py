"""Where each frame's attributes live: functional groups (Enhanced CT) or the top level.

In an Enhanced (or Legacy Converted Enhanced) CT instance, per-frame attributes
sit in a functional-group macro, one item deep:
``PerFrameFunctionalGroupsSequence[i].<Macro>[0]`` when they vary per frame,
else ``SharedFunctionalGroupsSequence[0].<Macro>[0]`` (per-frame wins,
PS3.3 C.7.6.16). A classic single-frame CT image keeps them at the top level,
which is also the fallback when a macro is absent.
"""

from collections import abc
from dataclasses import dataclass
from typing import List, Optional

from edge.dicom.values import describe, element_value
from edge.errors import DicomError


@dataclass(frozen=True)
class FrameAttributeSources:
    """The datasets holding one frame's attributes, by macro."""

    position: object  # ImagePositionPatient (PlanePositionSequence)
    orientation: object  # ImageOrientationPatient (PlaneOrientationSequence)
    measures: object  # PixelSpacing, SliceThickness (PixelMeasuresSequence)
    value_transform: object  # RescaleSlope/Intercept/Type (PixelValueTransformationSequence)
    frame_type: Optional[object]  # FrameType (CTImageFrameTypeSequence); None: use ImageType
    origin: str  # "frame i" for functional groups, "" for top level; prefixes messages


def frame_attribute_sources(ds, n_frames: int, source: Optional[str]) -> List[FrameAttributeSources]:
    """One :class:`FrameAttributeSources` per frame, in stored frame order."""
    per_frame = element_value(ds, "PerFrameFunctionalGroupsSequence", source)
    shared_seq = element_value(ds, "SharedFunctionalGroupsSequence", source)
    if per_frame is None and shared_seq is None:
        if n_frames != 1:
            raise DicomError(
                source,
                f"NumberOfFrames is {n_frames} but there are no functional groups giving each "
                "frame's position (not an Enhanced CT instance)",
            )
        return [FrameAttributeSources(ds, ds, ds, ds, None, "")]
    if per_frame is not None and len(per_frame) != n_frames:
        raise DicomError(
            source,
            f"{describe('PerFrameFunctionalGroupsSequence')} has {len(per_frame)} items "
            f"but NumberOfFrames is {n_frames}",
        )
    shared = shared_seq[0] if shared_seq is not None else None
    sources = []
    for index in range(n_frames):
        groups = [g for g in (per_frame[index] if per_frame is not None else None, shared) if g is not None]
        origin = f"frame {index}"

        found = {
            keyword: _macro_item(groups, keyword, origin, source)
            for keyword in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                            "PixelValueTransformationSequence")
        }
        top_level_if_absent = {keyword: ds if item is None else item for keyword, item in found.items()}
        sources.append(
            FrameAttributeSources(
                position=top_level_if_absent["PlanePositionSequence"],
                orientation=top_level_if_absent["PlaneOrientationSequence"],
                measures=top_level_if_absent["PixelMeasuresSequence"],
                value_transform=top_level_if_absent["PixelValueTransformationSequence"],
                frame_type=_macro_item(groups, "CTImageFrameTypeSequence", origin, source),
                origin=origin,
            )
        )
    return sources


def _macro_item(groups, keyword: str, origin: str, source: Optional[str]):
    """Item 0 of macro ``keyword`` from the first group holding it, or None."""
    for group in groups:
        items = element_value(group, keyword, source)
        if items is None:
            continue
        first = items[0] if isinstance(items, abc.Sequence) and not isinstance(items, (str, bytes)) else None
        if first is None or not hasattr(first, "keys"):
            raise DicomError(source, f"{origin}: {describe(keyword)} is not a sequence of items")
        return first
    return None
