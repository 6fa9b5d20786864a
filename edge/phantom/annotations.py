"""Ground-truth tables of a phantom set (LUNA16 layout plus sidecars).

``annotations.csv``: seriesuid,coordX,coordY,coordZ,diameter_mm (patient mm,
LPS, the frame of ImagePositionPatient). ``annotations_meta.csv``: one row per
nodule with its kind and location. ``series.csv``: every series, including
those without nodules.
"""

import csv
from pathlib import Path
from typing import Dict, List

from edge.errors import InputError
from edge.phantom.series import PhantomSeries

ANNOTATIONS_FILE = "annotations.csv"
META_FILE = "annotations_meta.csv"
SERIES_FILE = "series.csv"
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
META_COLUMNS = ("seriesuid", "index", "type", "location", "diameter_mm", "hu")
SERIES_COLUMNS = ("seriesuid", "folder", "profile", "n_slices", "n_nodules", "seed", "slice_thickness",
                  "slice_spacing", "pixel_spacing", "contrast", "manufacturer")


class PhantomSetWriter:
    """Appends each series' rows to the three tables as the series is written.

    Rows are flushed per series, so an interrupted run leaves consistent tables
    for the series that were completed.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._files = {}
        self._writers = {}
        for name, cols in ((ANNOTATIONS_FILE, ANNOTATION_COLUMNS), (META_FILE, META_COLUMNS),
                           (SERIES_FILE, SERIES_COLUMNS)):
            f = open(self.out_dir / name, "w", newline="")
            w = csv.writer(f)
            w.writerow(cols)
            self._files[name], self._writers[name] = f, w

    def add(self, series: PhantomSeries, folder: str) -> None:
        acq = series.acquisition
        uid = series.series_uid
        for i, n in enumerate(series.nodules):
            x, y, z = n.center
            self._writers[ANNOTATIONS_FILE].writerow([uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}", f"{n.diameter_mm:.3f}"])
            self._writers[META_FILE].writerow([uid, i, n.kind, n.location, f"{n.diameter_mm:.3f}", f"{n.hu:.1f}"])
        self._writers[SERIES_FILE].writerow([
            uid, folder, series.profile.name, series.n_slices, len(series.nodules), series.seed,
            f"{acq.slice_thickness:g}", f"{acq.slice_spacing:g}", f"{acq.pixel_spacing:.6f}", int(acq.contrast),
            series.profile.manufacturer,
        ])
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "PhantomSetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_table(path) -> List[Dict[str, str]]:
    """Rows of one of the tables as dicts; raises InputError if missing or headerless."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise InputError(path, "empty table (no header row)")
            return list(reader)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
