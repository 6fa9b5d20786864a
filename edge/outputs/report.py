"""The committed result of one series, as stored in the ledger and written out by the exporters.

:class:`SeriesReport` round-trips through JSON (the ledger keeps it). Its public
forms -- :meth:`SeriesReport.finding_lines` and :meth:`SeriesReport.summary_line`
-- carry UIDs and measurements only: no patient name, ID or birth date, and no
file paths (a watched folder's file names may hold a patient's name).
"""

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

FINDING_FIELDS = (
    "x", "y", "z", "diameter_mm", "probability", "max_score", "n_slices", "z_extent_mm",
    "first_slice_location", "last_slice_location", "key_slice_location",
)


@dataclass(frozen=True)
class FindingRecord:
    """One finding of a series result: the aggregated :class:`~edge.decode.findings.Finding`
    (patient mm, DICOM LPS) plus the instance it is best seen on."""

    index: int  # 1-based within the result
    x: float
    y: float
    z: float
    diameter_mm: float
    probability: float
    max_score: float
    n_slices: int
    z_extent_mm: float
    first_slice_location: float
    last_slice_location: float
    key_slice_location: float
    key_sop_instance_uid: str = ""
    key_frame_index: int = 0

    @classmethod
    def from_finding(cls, index: int, finding, key_sop_instance_uid: str = "", key_frame_index: int = 0) -> "FindingRecord":
        values = {name: getattr(finding, name) for name in FINDING_FIELDS}
        return cls(index=index, key_sop_instance_uid=key_sop_instance_uid, key_frame_index=key_frame_index, **values)


@dataclass
class SeriesReport:
    """Everything the exporters need about one committed series result."""

    result_id: str
    part: int
    study_uid: str
    series_uid: str
    findings: List[FindingRecord]
    sop_instance_uids: List[str]
    n_slices: int
    rejected: List[Tuple[str, str]] = field(default_factory=list)
    closed_reason: str = ""
    streamed: bool = True
    model: Dict[str, str] = field(default_factory=dict)
    committed_at: str = ""
    timings_ms: Dict[str, float] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> spool file (private)
    report_threshold: Optional[float] = None  # the model's (decode spec), recorded at commit; None: it had none

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rejected"] = [list(r) for r in self.rejected]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SeriesReport":
        d = dict(d)
        d["findings"] = [FindingRecord(**f) for f in d.get("findings", [])]
        d["rejected"] = [tuple(r) for r in d.get("rejected", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def source_of(self, sop_instance_uid: str) -> Optional[str]:
        return self.sources.get(sop_instance_uid)

    def finding_lines(self) -> List[dict]:
        """One JSON object per finding."""
        lines = []
        for f in self.findings:
            line = {"type": "finding", "result_id": self.result_id, "study_uid": self.study_uid,
                    "series_uid": self.series_uid}
            line.update(asdict(f))
            lines.append(line)
        return lines

    def summary_line(self) -> dict:
        """The per-series summary object."""
        return {
            "type": "series",
            "result_id": self.result_id,
            "part": self.part,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "n_findings": len(self.findings),
            "n_instances": len(self.sop_instance_uids),
            "n_slices": self.n_slices,
            "sop_instance_uids": list(self.sop_instance_uids),
            "rejected": [{"sop_instance_uid": k, "reason": r} for k, r in self.rejected],
            "closed_reason": self.closed_reason,
            "streamed": self.streamed,
            "model": dict(self.model),
            "model_report_threshold": self.report_threshold,
            "committed_at": self.committed_at,
            "timings_ms": dict(self.timings_ms),
        }
