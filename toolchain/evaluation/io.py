"""LUNA16-format CSV readers. Every problem is an InputError naming the file.

- predictions: ``seriesuid,coordX,coordY,coordZ,probability`` (also per-slice findings);
- annotations (and excluded annotations): ``seriesuid,coordX,coordY,coordZ,diameter_mm``;
- series list: any CSV with a ``seriesuid`` column;
- annotations meta: ``seriesuid,index,type,location,diameter_mm``, ``index`` being
  the 0-based order of that series' rows in annotations.csv;
- slice positions: ``seriesuid,coordZ``, one row per image.

Extra columns are ignored; coordinates are in mm.
"""

import csv
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from edge.errors import InputError
from toolchain.evaluation.froc import Candidates, NoduleMeta, Nodules

PREDICTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
META_COLUMNS = ("seriesuid", "index")
SLICE_COLUMNS = ("seriesuid", "coordZ")


def read_table(path, required: Sequence[str]) -> Tuple[List[str], List[Dict[str, str]]]:
    """Header and rows (dicts) of a CSV that must have the ``required`` columns."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [line for line in reader if any(cell.strip() for cell in line)]
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read CSV: {exc}") from None
    if not lines:
        raise InputError(path, f"empty file; expected a header with columns {','.join(required)}")
    header = [cell.strip() for cell in lines[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise InputError(path, f"line {number}: {len(line)} fields, header has {len(header)}")
        rows.append({key: value.strip() for key, value in zip(header, line)})
    return header, rows


def _number(path, row_number: int, row: Dict[str, str], column: str) -> float:
    text = row[column]
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"line {row_number}: {column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise InputError(path, f"line {row_number}: {column} is not finite: {text!r}")
    return value


def _uid(path, row_number: int, row: Dict[str, str]) -> str:
    if not row["seriesuid"]:
        raise InputError(path, f"line {row_number}: empty seriesuid")
    return row["seriesuid"]


def _points(path, rows, value_column: str):
    uids, centers, values = [], [], []
    for number, row in enumerate(rows, start=2):
        uids.append(_uid(path, number, row))
        centers.append([_number(path, number, row, c) for c in ("coordX", "coordY", "coordZ")])
        values.append(_number(path, number, row, value_column))
    return tuple(uids), np.asarray(centers, float).reshape(-1, 3), np.asarray(values, float)


def read_predictions(path) -> Candidates:
    """CAD marks (LUNA16 submission format)."""
    _, rows = read_table(path, PREDICTION_COLUMNS)
    return Candidates(*_points(path, rows, "probability"))


def read_annotations(path) -> Nodules:
    """Nodule annotations (annotations.csv or annotations_excluded.csv)."""
    _, rows = read_table(path, ANNOTATION_COLUMNS)
    return Nodules(*_points(path, rows, "diameter_mm"))


def read_series_list(path) -> Tuple[str, ...]:
    """The seriesuid column, in order, duplicates removed."""
    _, rows = read_table(path, ("seriesuid",))
    return tuple(dict.fromkeys(_uid(path, n, row) for n, row in enumerate(rows, start=2)))


def read_annotations_meta(path, nodules: Nodules) -> NoduleMeta:
    """Per-nodule type/location/diameter, aligned with ``nodules`` via (seriesuid, index)."""
    _, rows = read_table(path, META_COLUMNS)
    rows_of_series: Dict[str, List[int]] = {}
    for i, uid in enumerate(nodules.seriesuids):
        rows_of_series.setdefault(uid, []).append(i)
    types = [""] * len(nodules)
    locations = [""] * len(nodules)
    diameters = np.full(len(nodules), np.nan)
    seen = set()
    for number, row in enumerate(rows, start=2):
        uid = _uid(path, number, row)
        try:
            index = int(row["index"])
        except ValueError:
            raise InputError(path, f"line {number}: index is not an integer: {row['index']!r}") from None
        series_rows = rows_of_series.get(uid, [])
        if not 0 <= index < len(series_rows):
            raise InputError(
                path, f"line {number}: series {uid} has {len(series_rows)} annotated nodule(s), no index {index}")
        if (uid, index) in seen:
            raise InputError(path, f"line {number}: duplicate entry for series {uid} index {index}")
        seen.add((uid, index))
        target = series_rows[index]
        types[target] = row.get("type", "")
        locations[target] = row.get("location", "")
        if row.get("diameter_mm", ""):
            diameters[target] = _number(path, number, row, "diameter_mm")
    return NoduleMeta(tuple(types), tuple(locations), diameters)


def read_slice_positions(path) -> Dict[str, np.ndarray]:
    """Image z positions (mm) per series, sorted; one CSV row per image."""
    _, rows = read_table(path, SLICE_COLUMNS)
    positions: Dict[str, List[float]] = {}
    for number, row in enumerate(rows, start=2):
        positions.setdefault(_uid(path, number, row), []).append(_number(path, number, row, "coordZ"))
    return {uid: np.sort(np.asarray(z, float)) for uid, z in positions.items()}
