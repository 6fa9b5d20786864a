"""A folder of DICOM files in any layout -> CT series, with every unusable file reported.

Two passes keep memory bounded by one series: headers only to group files by
series, then full decoding one series at a time. Nothing here stops on a bad
file: each becomes a :class:`Rejection` naming the file and the reason.
"""

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from edge.dicom.reader import DicomHeader, read_frames, read_header
from edge.errors import DicomError
from edge.frame import CTFrame


@dataclass(frozen=True)
class Rejection:
    path: str
    reason: str


@dataclass
class SeriesFiles:
    study_uid: str
    series_uid: str
    paths: List[str] = field(default_factory=list)


def iter_files(root) -> Iterator[Path]:
    """Regular files under ``root`` in a stable order (symlinked directories are not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                yield p


def scan_file(path) -> Union[DicomHeader, Rejection]:
    """The header of one file that can join a CT series, else the Rejection saying why not."""
    try:
        h = read_header(path)
    except DicomError as e:
        return Rejection(str(path), e.reason)
    if not h.is_ct:
        return Rejection(str(path), f"not a CT image (modality {h.modality or 'missing'}, "
                                    f"SOP class {h.sop_class_uid or 'missing'})")
    if not h.series_uid:
        return Rejection(str(path), "no SeriesInstanceUID")
    if h.is_localizer:
        return Rejection(str(path), "localizer (scout) image, not part of the axial series")
    return h


def group_scanned(scans: Iterable[Tuple[str, Union[DicomHeader, Rejection]]]
                  ) -> Tuple[List[SeriesFiles], List[Rejection]]:
    """(path, :func:`scan_file` result) pairs, in folder order -> series (first-seen order) and rejections."""
    groups: Dict[Tuple[str, str], SeriesFiles] = {}
    rejected: List[Rejection] = []
    for path, scanned in scans:
        if isinstance(scanned, Rejection):
            rejected.append(scanned)
        else:
            groups.setdefault(scanned.series_key, SeriesFiles(*scanned.series_key)).paths.append(str(path))
    return list(groups.values()), rejected


def check_folder(root) -> Path:
    """``root`` as a Path; DicomError when it is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise DicomError(root, "not a directory")
    return root


def group_series(root, record: Optional[Callable[[str, float], None]] = None
                 ) -> Tuple[List[SeriesFiles], List[Rejection]]:
    """Group the CT files under ``root`` by series; everything else is a rejection.

    ``record("scan", seconds)`` receives each file's header read time."""

    def scans():
        for p in iter_files(check_folder(root)):
            t0 = time.perf_counter()
            scanned = scan_file(p)
            if record is not None:
                record("scan", time.perf_counter() - t0)
            yield p, scanned

    return group_scanned(scans())


def load_series(series: SeriesFiles, record: Optional[Callable[[str, float], None]] = None
                ) -> Tuple[List[CTFrame], List[Rejection]]:
    """Decode every file of one series; files that fail become rejections.

    ``record("decode", seconds)`` receives each file's read and decode time."""
    frames: List[CTFrame] = []
    rejected: List[Rejection] = []
    seen = defaultdict(int)
    for p in series.paths:
        t0 = time.perf_counter()
        try:
            fs = read_frames(p)
        except DicomError as e:
            rejected.append(Rejection(p, e.reason))
            continue
        finally:
            if record is not None:
                record("decode", time.perf_counter() - t0)
        for f in fs:
            key = (f.sop_uid, f.frame_index)
            seen[key] += 1
            if seen[key] > 1:
                rejected.append(Rejection(p, f"duplicate SOP Instance UID {f.sop_uid} frame {f.frame_index}"))
                continue
            if f.is_localizer:
                rejected.append(Rejection(p, "localizer frame"))
                continue
            frames.append(f)
    return frames, rejected
