"""JSON Lines out: ``findings.jsonl`` (one line per finding) and ``series.jsonl`` (one summary per series result).

Appends are fsynced. Exactly once per result: the finding lines of a result are
written before its summary line, so a summary line means the result is complete.
Re-writing a result after a crash (``recovering=True``) first checks for its
summary line and, when there is none, removes any finding lines the crashed
write left before appending them again. A line torn by a crash mid-write is cut
off when the writer opens the files.
"""

import json
import os
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from edge.ingest.spool import write_durably
from edge.outputs.report import SeriesReport

FINDINGS_FILE = "findings.jsonl"
SERIES_FILE = "series.jsonl"


def read_jsonl(path) -> List[dict]:
    """Every complete line of a JSON Lines file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in _complete_lines(path)]


def _complete_lines(path: Path) -> Iterator[str]:
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                yield line


def _result_id(line: str) -> str:
    try:
        return str(json.loads(line).get("result_id", ""))
    except (ValueError, AttributeError):  # not an object: not one of ours
        return ""


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write interrupted by a crash)."""
    if not path.exists():
        return
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


class JsonlWriter:
    """Appends series results to the two files in ``out_dir``."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.findings_path = self.out_dir / FINDINGS_FILE
        self.series_path = self.out_dir / SERIES_FILE
        self._lock = threading.Lock()
        for p in (self.findings_path, self.series_path):
            _cut_torn_tail(p)

    def write(self, report: SeriesReport, recovering: bool = False, overlays: Optional[Dict[int, str]] = None,
              sr: Optional[str] = None) -> None:
        """Append a result's lines; ``overlays`` (finding index -> file) and ``sr`` (file) are
        added to them as paths relative to the output folder."""
        findings = report.finding_lines()
        for line in findings:
            if overlays and line["index"] in overlays:
                line["overlay"] = overlays[line["index"]]
        summary = report.summary_line()
        if sr:
            summary["sr"] = sr
        with self._lock:
            if recovering:
                if self._has_summary(report.result_id):
                    return
                self._remove_findings_of(report.result_id)
            self._append(self.findings_path, findings)
            self._append(self.series_path, [summary])

    def _append(self, path: Path, objects: List[dict]) -> None:
        if not objects:
            return
        text = "".join(json.dumps(o, sort_keys=True, separators=(",", ":")) + "\n" for o in objects)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _has_summary(self, result_id: str) -> bool:
        return self.series_path.exists() and any(_result_id(line) == result_id
                                                 for line in _complete_lines(self.series_path))

    def _remove_findings_of(self, result_id: str) -> None:
        if not self.findings_path.exists():
            return
        lines = list(_complete_lines(self.findings_path))
        kept = [line for line in lines if _result_id(line) != result_id]
        if len(kept) != len(lines):
            write_durably(self.findings_path, "".join(kept).encode("utf-8"))
