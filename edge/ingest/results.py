"""Final states and results: the pipeline's sink, backed by the ledger, the spool and the exporter.

Exactly once per SOP Instance UID:

1. :meth:`ResultStore.commit` stores the series report and marks its instances
   processed (or rejected) in ONE ledger transaction. Before it, a kill -9
   leaves the instances ``received``: the restart replays them from the spool
   and the series is computed again from scratch. After it, they are final and
   the restart does not replay them.
2. The exporter writes the outputs (idempotent writers); then the result is
   marked exported and the spool files are deleted. A crash in between is
   repaired by :meth:`ResultStore.recover`, which exports again the results not
   marked exported (their spool files are still there).

Logs name instances by UID only.
"""

import dataclasses
import logging
from datetime import datetime, timezone
from typing import Dict, Optional

from edge.ingest.assembly import SeriesOutcome
from edge.ingest.ledger import RECEIVED, Ledger
from edge.ingest.pipeline import Instance, PipelineSink
from edge.ingest.spool import Spool
from edge.metrics import RuntimeMetrics
from edge.outputs.exporter import ExportError, SeriesExporter
from edge.outputs.report import FindingRecord, SeriesReport

log = logging.getLogger(__name__)


class ResultStore(PipelineSink):
    """The service's :class:`~edge.ingest.pipeline.PipelineSink`."""

    def __init__(self, ledger: Ledger, spool: Spool, exporter: Optional[SeriesExporter],
                 metrics: Optional[RuntimeMetrics] = None, model: Optional[Dict[str, str]] = None,
                 timings=None):
        self.ledger = ledger
        self.spool = spool
        self.exporter = exporter
        self.metrics = metrics
        self.model = dict(model or {})
        self.timings = timings  # callable -> {stage: {...}} for the summary line, or None

    def reject(self, instance: Instance, reason: str, stage: str) -> None:
        first = instance.frames[0] if instance.frames else None
        changed = self.ledger.reject(
            instance.key, reason, source=instance.source,
            study_uid=first.study_uid if first else "", series_uid=first.series_uid if first else "",
        )
        if instance.path is not None:
            self.spool.quarantine(instance.key, path=instance.path)
        if changed:
            log.info("rejected %s at %s: %s", instance.key, stage, reason)
            if self.metrics is not None:
                self.metrics.rejected.inc(stage=stage)

    def finding(self, study_uid: str, series_uid: str, finding) -> None:
        log.info("finding in series %s at (%.1f, %.1f, %.1f) mm, diameter %.1f mm, probability %.2f",
                 series_uid, finding.x, finding.y, finding.z, finding.diameter_mm, finding.probability)
        if self.metrics is not None:
            self.metrics.findings.inc()

    def commit(self, outcome: SeriesOutcome) -> Optional[str]:
        """Commit a closed series, then export it; returns the result id (None when nothing was analysed)."""
        if not outcome.processed_keys:
            for key, reason in outcome.rejected:
                self.ledger.reject(key, reason)
                self._quarantine_key(key)
            if outcome.rejected and self.metrics is not None:
                self.metrics.rejected.inc(len(outcome.rejected), stage="series")
            return None
        outcome = self._only_unfinished(outcome)
        if not outcome.processed_keys:
            return None
        stored = self.ledger.commit_series(outcome.study_uid, outcome.series_uid, self._report(outcome).to_dict(),
                                           outcome.processed_keys, outcome.rejected)
        report = SeriesReport.from_dict(stored)
        result_id = report.result_id
        log.info("series %s committed as %s: %d instance(s), %d slice(s), %d finding(s)%s",
                 outcome.series_uid, result_id, len(outcome.processed_keys), len(outcome.members),
                 len(outcome.findings), "" if outcome.streamed else f" (re-run in position order: {outcome.fallback_reason})")
        if self.metrics is not None:
            self.metrics.processed.inc(len(outcome.processed_keys))
            self.metrics.series.inc()
            if outcome.rejected:
                self.metrics.rejected.inc(len(outcome.rejected), stage="series")
        for key, _ in outcome.rejected:
            self._quarantine_key(key)
        self._export(report, recovering=False)
        return result_id

    def _only_unfinished(self, outcome: SeriesOutcome) -> SeriesOutcome:
        """Drop instances that already have a final state (queued twice by a restart racing a resend):
        their results exist, a second set would break exactly-once."""
        def unfinished(key):
            entry = self.ledger.get(key)
            return entry is not None and entry.state == RECEIVED

        done = [k for k in outcome.processed_keys if not unfinished(k)]
        if not done and all(unfinished(k) for k, _ in outcome.rejected):
            return outcome
        log.warning("series %s: %d instance(s) already final left out of this result", outcome.series_uid, len(done))
        keep = set(k for k in outcome.processed_keys if unfinished(k))
        return dataclasses.replace(
            outcome,
            processed_keys=[k for k in outcome.processed_keys if k in keep],
            rejected=[(k, r) for k, r in outcome.rejected if unfinished(k)],
            members=[m for m in outcome.members if m.key in keep],
        )

    def recover(self) -> int:
        """Export again every committed result not marked exported; returns how many."""
        pending = self.ledger.results(exported=False)
        for payload in pending:
            self._export(SeriesReport.from_dict(payload), recovering=True)
        return len(pending)

    def _export(self, report: SeriesReport, recovering: bool) -> bool:
        if self.exporter is not None:
            try:
                self.exporter.export(report, recovering=recovering)
            except ExportError as e:
                log.error("%s (kept for the next start)", e)
                if self.metrics is not None:
                    for output in e.failures:
                        self.metrics.export_failures.inc(output=output.split()[0])
                return False
        self.ledger.mark_exported(report.result_id)
        for path in report.sources.values():
            self.spool.remove(path)
        return True

    def _quarantine_key(self, key: str) -> None:
        entry = self.ledger.get(key)
        if entry is not None and entry.spool_path:
            self.spool.quarantine(key, path=entry.spool_path)

    def _report(self, outcome: SeriesOutcome) -> SeriesReport:
        findings = []
        for i, f in enumerate(outcome.findings, start=1):
            member = outcome.member_near(f.key_slice_location)
            findings.append(FindingRecord.from_finding(
                i, f, member.sop_uid if member else "", member.frame_index if member else 0))
        sources = {}
        uids = []
        for m in outcome.members:
            if m.sop_uid not in sources:
                uids.append(m.sop_uid)
                if m.path is not None:
                    sources[m.sop_uid] = m.path
        timings = {}
        if self.timings is not None:
            timings = {k: round(v["p50_ms"], 3) for k, v in self.timings().items()}
        return SeriesReport(
            result_id="",
            part=0,
            study_uid=outcome.study_uid,
            series_uid=outcome.series_uid,
            findings=findings,
            sop_instance_uids=uids,
            n_slices=len(outcome.members),
            rejected=list(outcome.rejected),
            closed_reason=outcome.closed_reason,
            streamed=outcome.streamed,
            model=dict(outcome.model) if outcome.model else self.model,  # the model can change between series
            committed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            timings_ms=timings,
            sources=sources,
            report_threshold=outcome.report_threshold,
        )
