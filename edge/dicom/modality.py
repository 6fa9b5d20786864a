"""Which DICOM objects count as CT images.

Rule: Modality must be ``CT``. When SOPClassUID is present it must be one of
the CT image storage classes, so a secondary capture (a screenshot) labelled
CT is rejected. A file without Modality is accepted only when its SOP class is
a CT image storage class (Modality is Type 1, but some anonymisers drop it).
"""

from typing import Optional

from pydicom.uid import UID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"

CT_SOP_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
)

MISSING_MODALITY_NOTE = "Modality missing; accepted as CT from its SOP class"


def sop_class_name(sop_class_uid: str) -> str:
    """``Name (uid)`` of a SOP class for messages, or the bare UID when unknown."""
    name = UID(sop_class_uid).name
    return sop_class_uid if name == sop_class_uid else f"{name} ({sop_class_uid})"


def not_ct_reason(modality: str, sop_class_uid: str) -> Optional[str]:
    """Why an object with this Modality / SOPClassUID is not a CT image, or None when it is."""
    if modality:
        if modality.upper() != "CT":
            return f"modality {modality} is not CT"
        if sop_class_uid and sop_class_uid not in CT_SOP_CLASSES:
            return f"SOP class {sop_class_name(sop_class_uid)} is not a CT image storage class"
        return None
    if not sop_class_uid:
        return "neither Modality nor SOPClassUID is present: not a CT image"
    if sop_class_uid not in CT_SOP_CLASSES:
        return f"no Modality and SOP class {sop_class_name(sop_class_uid)} is not CT"
    return None
