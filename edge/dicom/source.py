"""Opening a DICOM source: a path, a binary file-like, or an in-memory pydicom Dataset.

A file without the 128-byte preamble and 'DICM' file meta header (old ACR-NEMA
style, or a raw network dump) is read again with ``force=True``, and kept only
when the result looks like an image object: a well-formed SOPClassUID or a
Modality. The transfer syntax then comes from the encoding pydicom detected.
"""

import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from edge.dicom.values import exception_text
from edge.errors import DicomError

FORCED_READ_NOTE = "no DICOM file meta header (preamble and 'DICM'); read as a bare dataset"

_UID = re.compile(r"[0-9]+(\.[0-9]+)+")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


@dataclass(frozen=True)
class OpenedDataset:
    """A parsed dataset, the name of its source for messages (None: in memory), and read notes."""

    dataset: Dataset
    source: Optional[str]
    notes: Tuple[str, ...] = ()


def open_dataset(source, *, stop_before_pixels: bool = False) -> OpenedDataset:
    """Parse ``source`` (path, binary file-like or Dataset); DicomError naming it when it is not DICOM."""
    if isinstance(source, Dataset):
        filename = getattr(source, "filename", None)
        return OpenedDataset(source, filename if isinstance(filename, str) and filename else None)
    if isinstance(source, (str, bytes, os.PathLike)):
        path = os.fsdecode(source)
        if not os.path.exists(path):
            raise DicomError(path, "no such file")
        if os.path.isdir(path):
            raise DicomError(path, "is a directory, not a DICOM file")
        return _parse(path, path, None, stop_before_pixels)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        start = source.tell() if _seekable(source) else None
        return _parse(source, name if isinstance(name, str) else None, start, stop_before_pixels)
    raise TypeError(f"source must be a path, a binary file-like or a pydicom Dataset, not {type(source).__name__}")


def _parse(target, label: Optional[str], start: Optional[int], stop_before_pixels: bool) -> OpenedDataset:
    try:
        return OpenedDataset(pydicom.dcmread(target, stop_before_pixels=stop_before_pixels), label)
    except InvalidDicomError:
        pass  # no preamble / file meta: try as a bare dataset below
    except Exception as exc:  # pydicom raises OSError, EOFError, ValueError, struct.error, ...
        raise DicomError(label, f"not readable as DICOM: {exception_text(exc)}") from exc

    if not isinstance(target, str):
        if start is None:
            raise DicomError(label, "no DICOM file meta header, and the stream cannot be rewound to read it bare")
        target.seek(start)
    try:
        dataset = pydicom.dcmread(target, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # same as above: any parse failure means "not DICOM"
        raise DicomError(label, f"not a DICOM file: {exception_text(exc)}") from exc
    if not _looks_like_image_object(dataset):
        raise DicomError(label, "not a DICOM file: no file meta header, and no SOPClassUID or Modality")
    return OpenedDataset(dataset, label, (FORCED_READ_NOTE,))


def _looks_like_image_object(dataset: Dataset) -> bool:
    """A force-read dataset is trusted only if it has a well-formed SOPClassUID or Modality."""
    try:
        sop_class = dataset.get("SOPClassUID")
        modality = dataset.get("Modality")
    except Exception:  # garbage parsed as elements fails on conversion: not a dataset
        return False
    sop_ok = isinstance(sop_class, str) and _UID.fullmatch(sop_class.strip(" \x00")) is not None
    modality_ok = isinstance(modality, str) and _CODE_STRING.fullmatch(modality.strip()) is not None
    return sop_ok or modality_ok


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False
