"""Intake: one received instance -> checked, spooled durably, in the ledger, in the pipeline.

Every source goes through here: the Storage SCP (:meth:`Intake.offer_dataset`),
the watched folder and local replay (:meth:`Intake.offer_file`), and the
restart recovery of the spool (:meth:`Intake.recover`). The order of the steps
is what makes an acknowledged instance impossible to lose:

1. known key (SOP Instance UID) -> a duplicate: nothing to do (a rejected one is
   answered with its reason again);
2. an admission slot, else :data:`BUSY` (the SCP answers 0xA700, the scanner retries);
3. the instance is decoded and checked; a bad one is rejected with its reason;
4. the bytes are written to the spool and fsynced;
5. the ledger records it ``received`` (fsynced);
6. it is queued; only now does the source get :data:`STORED` (C-STORE 0x0000).
"""

import hashlib
import io
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pydicom

from edge.dicom.modality import not_ct_reason
from edge.dicom.reader import read_frames, read_header
from edge.errors import DicomError
from edge.ingest.ledger import RECEIVED, REJECTED, Ledger
from edge.ingest.pipeline import Instance, Pipeline
from edge.ingest.spool import Spool
from edge.metrics import RuntimeMetrics

log = logging.getLogger(__name__)

STORED = "stored"
DUPLICATE = "duplicate"
BUSY = "busy"
REJECTED_NOW = "rejected"

# C-STORE statuses (PS3.4 B.2.3 and Annex GG)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class IntakeResult:
    """What happened to an offered instance: ``outcome`` is one of STORED, DUPLICATE, BUSY, REJECTED_NOW."""

    outcome: str
    key: str
    status: int  # the C-STORE status to answer
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """The instance is safe (spooled now or before): the source may forget it."""
        return self.outcome in (STORED, DUPLICATE)


class Intake:
    """See the module docstring."""

    def __init__(self, ledger: Ledger, spool: Spool, pipeline: Pipeline, metrics: Optional[RuntimeMetrics] = None,
                 keep_rejected: bool = True):
        self.ledger = ledger
        self.spool = spool
        self.pipeline = pipeline
        self.metrics = metrics
        self.keep_rejected = keep_rejected
        self.closed = threading.Event()

    # --- sources

    def offer_dataset(self, key: str, dataset: pydicom.Dataset, encoded: bytes, source: str,
                      sop_class_uid: str = "") -> IntakeResult:
        """An instance received over the network. ``key`` is the request's Affected SOP Instance UID,
        ``sop_class_uid`` its Affected SOP Class UID; ``encoded`` the file bytes (with file meta)."""
        if self.closed.is_set():
            return IntakeResult(BUSY, key, STATUS_OUT_OF_RESOURCES, "the service is shutting down")
        known = self._known(key)
        if known is not None:
            return known
        if not self.pipeline.try_admit():
            if self.metrics is not None:
                self.metrics.out_of_resources.inc()
            return IntakeResult(BUSY, key, STATUS_OUT_OF_RESOURCES, "pipeline queue full; retry later")
        return self._admitted(key, dataset, encoded, source, sop_class_uid)

    def offer_file(self, path, source: str, block: bool = False, timeout: Optional[float] = None) -> IntakeResult:
        """A file (watched folder, replay). With ``block`` wait for an admission slot (up to ``timeout``)."""
        path = Path(path)
        data = path.read_bytes()
        try:
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            key = str(dataset.get("SOPInstanceUID", "") or "").strip()
        except Exception:  # anything pydicom raises on garbage: the file is rejected below by its hash
            dataset, key = None, ""
        if not _UID.fullmatch(key):
            key = "file:" + hashlib.sha1(data).hexdigest()
        known = self._known(key)
        if known is not None:
            return known
        if self.closed.is_set():
            return IntakeResult(BUSY, key, STATUS_OUT_OF_RESOURCES, "the service is shutting down")
        admitted = self.pipeline.admit(timeout) if block else self.pipeline.try_admit()
        if not admitted:
            return IntakeResult(BUSY, key, STATUS_OUT_OF_RESOURCES, "pipeline queue full; retry later")
        if dataset is None:
            return self._reject_admitted(key, "not readable as DICOM", data, source, STATUS_CANNOT_UNDERSTAND)
        return self._admitted(key, dataset, data, source, "")

    def reject_undecodable(self, key: str, reason: str, source: str) -> IntakeResult:
        """A network dataset too broken to decode at all: recorded as rejected (0xC000)."""
        if not key:
            return IntakeResult(REJECTED_NOW, key, STATUS_CANNOT_UNDERSTAND, reason)
        known = self._known(key)
        if known is not None:  # a good copy was stored before, or the same rejection
            return known
        if self.ledger.reject(key, reason, source=source):
            log.info("rejected %s from %s: %s", key, source.split(":", 1)[0], reason)
            if self.metrics is not None:
                self.metrics.rejected.inc(stage="receive")
        return IntakeResult(REJECTED_NOW, key, STATUS_CANNOT_UNDERSTAND, reason)

    # --- steps

    def _known(self, key: str) -> Optional[IntakeResult]:
        entry = self.ledger.get(key)
        if entry is None:
            return None
        if self.metrics is not None:
            self.metrics.duplicates.inc()
        if entry.state == REJECTED:
            return IntakeResult(REJECTED_NOW, key, _status_for(entry.reason or ""), entry.reason or "rejected")
        return IntakeResult(DUPLICATE, key, STATUS_SUCCESS)

    def _admitted(self, key: str, dataset, encoded: bytes, source: str, sop_class_uid: str) -> IntakeResult:
        t0 = time.perf_counter()
        reason = _mismatch(key, dataset, sop_class_uid)
        if reason:
            return self._reject_admitted(key, reason, encoded, source, STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS)
        try:
            frames = read_frames(dataset)
        except DicomError as e:
            return self._reject_admitted(key, e.reason, encoded, source, _status_for(e.reason))
        except BaseException:  # a bug, not bad input: give the slot back and let it surface
            self.pipeline.release()
            raise
        first = frames[0]
        t1 = time.perf_counter()
        self.pipeline.latency.record("decode", t1 - t0)
        try:
            path = self.spool.write(key, encoded)
        except OSError as e:
            self.pipeline.release()
            log.error("spool write failed for %s: %s", key, e.strerror or e)
            return IntakeResult(BUSY, key, STATUS_OUT_OF_RESOURCES, "spool write failed")
        existing = self.ledger.receive(key, study_uid=first.study_uid, series_uid=first.series_uid,
                                       source=source, spool_path=str(path))
        if existing is not None:  # another association stored the same instance meanwhile
            self.pipeline.release()
            return self._known(key) or IntakeResult(DUPLICATE, key, STATUS_SUCCESS)
        self.pipeline.submit(Instance(key=key, source=source, path=str(path), frames=frames, received_at=t0))
        self.pipeline.latency.record("receive", time.perf_counter() - t1)  # spool write + ledger: durability
        if self.metrics is not None:
            self.metrics.received.inc(source=source.split(":", 1)[0])
        return IntakeResult(STORED, key, STATUS_SUCCESS)

    def _reject_admitted(self, key: str, reason: str, encoded: bytes, source: str, status: int) -> IntakeResult:
        self.pipeline.release()
        if self.ledger.reject(key, reason, source=source):
            if self.keep_rejected:
                self.spool.quarantine(key, data=encoded)
            log.info("rejected %s from %s: %s", key, source.split(":", 1)[0], reason)
            if self.metrics is not None:
                self.metrics.rejected.inc(stage="receive")
        return IntakeResult(REJECTED_NOW, key, status, reason)

    # --- restart

    def recover(self, stop: Optional[threading.Event] = None) -> int:
        """Queue again every spooled instance that has no final state; returns how many.

        Blocks on admission (run it in its own thread while the pipeline runs)."""
        self.spool.clear_tmp()
        queued = 0
        pending = {e.key: e for e in self.ledger.pending()}
        seen_paths = set()
        for key, entry in pending.items():
            path = entry.spool_path
            if not path or not Path(path).exists():
                self.ledger.reject(key, "spool file missing at restart")
                continue
            seen_paths.add(str(path))
            if self._requeue(key, str(path), entry.source, stop):
                queued += 1
        for path in self.spool.files():
            if str(path) in seen_paths:
                continue
            queued += self._adopt(path, stop)
        if queued:
            log.info("restart: %d spooled instance(s) queued again", queued)
        return queued

    def _requeue(self, key: str, path: str, source: str, stop) -> bool:
        while not self.pipeline.admit(timeout=0.5):
            if stop is not None and stop.is_set():
                return False
        self.pipeline.submit(Instance(key=key, source=source or "spool", path=path, received_at=time.perf_counter()))
        return True

    def _adopt(self, path: Path, stop) -> int:
        """A spool file the ledger does not list as pending: written just before a crash, or already final."""
        try:
            header = read_header(path)
            key = header.sop_uid
        except DicomError:
            header, key = None, ""
        if not key:
            key = "file:" + hashlib.sha1(path.read_bytes()).hexdigest()
        entry = self.ledger.get(key)
        if entry is not None and entry.state != RECEIVED:
            if entry.state == REJECTED:
                self.spool.quarantine(key, path=path)
            elif not self._needed_for_export(str(path)):
                self.spool.remove(path)
            return 0
        if entry is not None:
            return 0  # received meanwhile by a source, which queued it
        existing = self.ledger.receive(key, study_uid=header.study_uid if header else "",
                                       series_uid=header.series_uid if header else "", source="spool",
                                       spool_path=str(path))
        if existing is not None:
            return 0
        return int(self._requeue(key, str(path), "spool", stop))

    def _needed_for_export(self, path: str) -> bool:
        return any(path in payload.get("sources", {}).values() for payload in self.ledger.results(exported=False))


def _mismatch(key: str, dataset, sop_class_uid: str) -> str:
    """Why the dataset does not match its C-STORE request or is not CT (0xA900), or ""."""
    try:
        sop_uid = str(dataset.get("SOPInstanceUID", "") or "").strip()
        dataset_class = str(dataset.get("SOPClassUID", "") or "").strip()
        modality = str(dataset.get("Modality", "") or "").strip()
    except Exception as e:  # a dataset pydicom cannot even parse lazily
        return f"dataset cannot be parsed: {e}"
    if sop_uid and sop_uid != key:
        return f"SOPInstanceUID {sop_uid} differs from the request's Affected SOP Instance UID {key}"
    if sop_class_uid and dataset_class and dataset_class != sop_class_uid:
        return f"SOPClassUID {dataset_class} differs from the request's Affected SOP Class UID {sop_class_uid}"
    return not_ct_reason(modality, dataset_class or sop_class_uid) or ""


def _status_for(reason: str) -> int:
    """0xA900 for a dataset that is not what its SOP class says (not CT), else 0xC000."""
    text = reason.lower()
    if "is not ct" in text or "not a ct image" in text or "differs from the request" in text:
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    return STATUS_CANNOT_UNDERSTAND
