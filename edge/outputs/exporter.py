"""Writes one committed series result everywhere it goes: overlays, SR (+ PACS), then JSON Lines.

Layout under the output folder::

    findings.jsonl, series.jsonl
    overlays/<SeriesInstanceUID>/<result id>-finding<k>.png
    sr/<SeriesInstanceUID>/<result id>.dcm

Every writer is tried; failures are collected and raised together as
:class:`ExportError` (the caller then leaves the result marked not exported and
the next start writes it again: every writer is idempotent). The JSON Lines go
last, so a summary line means the overlays and the SR were written.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Optional

import pydicom

from edge.config import PacsConfig
from edge.dicom.reader import read_frames
from edge.errors import EdgeError
from edge.outputs.jsonl import JsonlWriter
from edge.outputs.overlay import write_overlay
from edge.outputs.report import SeriesReport

log = logging.getLogger(__name__)


class ExportError(EdgeError):
    """Some outputs of a result could not be written; ``failures`` maps output -> reason."""

    def __init__(self, result_id: str, failures: Dict[str, str]):
        self.failures = dict(failures)
        super().__init__(f"result {result_id}: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))


FALLBACK_REPORT_THRESHOLD = 0.5  # for results of models whose decode spec has no report_threshold


def report_threshold_for(site: Optional[float], model: Optional[float]) -> float:
    """The probability from which findings are reported: the site's setting, else the model's, else the fallback."""
    if site is not None:
        return site
    return FALLBACK_REPORT_THRESHOLD if model is None else model


class SeriesExporter:
    """Writes series results under ``out_dir``; each output can be switched off.

    ``report_threshold``: findings at or above it get overlays and SR entries
    (findings.jsonl keeps all); None: each result's own (the model's, recorded in
    :attr:`SeriesReport.report_threshold`), else :data:`FALLBACK_REPORT_THRESHOLD`.
    """

    def __init__(self, out_dir, jsonl: bool = True, overlays: bool = True, sr: bool = True,
                 pacs: Optional[PacsConfig] = None, manufacturer: str = "ct-edge",
                 report_threshold: Optional[float] = 0.0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = JsonlWriter(self.out_dir) if jsonl else None
        self.overlays = overlays
        self.sr = sr
        self.pacs = pacs if pacs is not None and pacs.enabled else None
        self.manufacturer = manufacturer
        self.report_threshold = report_threshold

    def threshold_for(self, report: SeriesReport) -> float:
        """The probability from which ``report``'s findings are reported."""
        return report_threshold_for(self.report_threshold, report.report_threshold)

    def export(self, report: SeriesReport, recovering: bool = False) -> Dict[str, object]:
        """Write every enabled output; returns what was written (relative paths)."""
        failures: Dict[str, str] = {}
        written: Dict[str, object] = {}
        overlay_paths: Dict[int, str] = {}
        threshold = self.threshold_for(report)
        reported = [f for f in report.findings if f.probability >= threshold]
        if self.overlays:
            for f in reported:
                try:
                    overlay_paths[f.index] = self._overlay(report, f)
                except (EdgeError, OSError, IndexError) as e:
                    failures[f"overlay {f.index}"] = str(e)
            written["overlays"] = overlay_paths
        sr_path = None
        if self.sr:
            try:
                sr_path, sr_dataset = self._sr(dataclasses.replace(report, findings=reported))
                written["sr"] = sr_path
                if self.pacs is not None:
                    self._send(report, sr_dataset, failures)
            except (EdgeError, OSError, ValueError, TypeError, AttributeError) as e:
                # highdicom raises ValueError/TypeError/AttributeError on evidence it cannot use
                failures["sr"] = f"{type(e).__name__}: {e}"
        if self.jsonl is not None:
            try:
                self.jsonl.write(report, recovering=recovering, overlays=overlay_paths, sr=sr_path)
                written["jsonl"] = True
            except OSError as e:
                failures["jsonl"] = str(e)
        if failures:
            raise ExportError(report.result_id, failures)
        return written

    def _overlay(self, report: SeriesReport, finding) -> str:
        source = report.source_of(finding.key_sop_instance_uid)
        if source is None:
            raise EdgeError(f"no source file for key slice {finding.key_sop_instance_uid}")
        frame = read_frames(source)[finding.key_frame_index]
        rel = Path("overlays") / report.series_uid / f"{report.result_id}-finding{finding.index}.png"
        label = f"#{finding.index} d={finding.diameter_mm:.1f}mm p={finding.probability:.2f}"
        write_overlay(self.out_dir / rel, frame, finding, label)
        return rel.as_posix()

    def _sr(self, report: SeriesReport):
        from edge.outputs.sr import build_sr, write_sr

        evidence = self._evidence(report)
        sr = build_sr(report, evidence, manufacturer=self.manufacturer)
        rel = Path("sr") / report.series_uid / f"{report.result_id}.dcm"
        write_sr(self.out_dir / rel, sr)
        return rel.as_posix(), sr

    def _evidence(self, report: SeriesReport) -> List[pydicom.Dataset]:
        evidence = []
        for uid in report.sop_instance_uids:
            path = report.source_of(uid)
            if path is None:
                continue
            try:
                evidence.append(pydicom.dcmread(path, stop_before_pixels=True, force=True))
            except (OSError, pydicom.errors.InvalidDicomError) as e:
                raise EdgeError(f"source {uid} cannot be read for the SR evidence: {e}") from None
        return evidence

    def _send(self, report: SeriesReport, sr, failures: Dict[str, str]) -> None:
        from edge.outputs.sr import send_sr

        p = self.pacs
        try:
            status = send_sr(sr, p.host, p.port, p.ae_title, p.calling_ae_title, p.timeout_s)
        except (OSError, ConnectionError, RuntimeError, ValueError) as e:
            failures["pacs"] = str(e)
            return
        if status not in (0x0000, 0xB000, 0xB007, 0xB006):
            failures["pacs"] = f"C-STORE status 0x{status:04X}"
        else:
            log.info("SR of %s sent to %s", report.result_id, p.ae_title)
