"""Replay a folder of series as a scanner would: C-STORE to an SCP, or straight into a local intake.

Files are sent series by series in InstanceNumber order (as scanners push), at
``rate`` slices per second when given (as fast as possible otherwise). Over
C-STORE a status 0xA7xx (out of resources) is retried after ``retry_delay_s``,
as a scanner does, up to ``max_retries`` times; with ``associations`` > 1 the
files are shared round-robin between that many concurrent associations. Files
that are not DICOM are skipped and counted.
"""

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from edge.dicom.reader import read_header
from edge.errors import DicomError, EdgeError
from edge.folder import iter_files
from edge.ingest.intake import BUSY, Intake

log = logging.getLogger(__name__)

OUT_OF_RESOURCES_MASK = 0xFF00
OUT_OF_RESOURCES = 0xA700


@dataclass
class ReplayReport:
    """What a replay did. ``statuses`` counts final statuses (0 = stored)."""

    sent: int = 0
    retries: int = 0
    skipped: List[str] = field(default_factory=list)  # not DICOM
    statuses: Counter = field(default_factory=Counter)
    failures: List[Tuple[str, int, str]] = field(default_factory=list)  # (SOP Instance UID, status, comment)
    elapsed_s: float = 0.0

    @property
    def stored(self) -> int:
        return self.statuses.get(0, 0)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def merge(self, other: "ReplayReport") -> None:
        self.sent += other.sent
        self.retries += other.retries
        self.skipped += other.skipped
        self.statuses.update(other.statuses)
        self.failures += other.failures


def replay_order(root) -> Tuple[List[Path], List[str]]:
    """The DICOM files under ``root`` in scanner order (series, then InstanceNumber); and the non-DICOM ones."""
    root = Path(root)
    if not root.is_dir():
        raise DicomError(root, "not a directory")
    keyed, skipped = [], []
    for path in iter_files(root):
        try:
            h = read_header(path)
        except DicomError:
            skipped.append(str(path))
            continue
        number = h.instance_number if h.instance_number is not None else 1 << 30
        keyed.append(((h.study_uid, h.series_uid), number, str(path)))
    first_seen: Dict[tuple, int] = {}
    for i, (series, _, _) in enumerate(keyed):
        first_seen.setdefault(series, i)
    keyed.sort(key=lambda k: (first_seen[k[0]], k[1], k[2]))
    return [Path(k[2]) for k in keyed], skipped


class RatePacer:
    """Holds item ``n`` until ``start + n / rate`` (no drift over a long replay)."""

    def __init__(self, rate: Optional[float], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate is not None and not rate > 0:
            raise EdgeError(f"replay rate must be > 0 slices/s, got {rate}")
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self._start: Optional[float] = None
        self._n = 0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if self.rate is None:
            return
        with self._lock:
            if self._start is None:
                self._start = self.clock()
            due = self._start + self._n / self.rate
            self._n += 1
        delay = due - self.clock()
        if delay > 0:
            self.sleep(delay)


def replay_local(files: Sequence[Path], intake: Intake, rate: Optional[float] = None,
                 stop: Optional[threading.Event] = None) -> ReplayReport:
    """Offer files to an intake (spool, ledger, pipeline), blocking while the pipeline is full."""
    report = ReplayReport()
    pacer = RatePacer(rate)
    t0 = time.monotonic()
    for path in files:
        if stop is not None and stop.is_set():
            break
        pacer.wait()
        while True:
            result = intake.offer_file(path, source="replay", block=True, timeout=0.5)
            if result.outcome != BUSY or (stop is not None and stop.is_set()):
                break
            report.retries += 1
        report.sent += 1
        report.statuses[result.status] += 1
        if result.status != 0:
            report.failures.append((result.key, result.status, result.reason))
    report.elapsed_s = time.monotonic() - t0
    return report


def replay_cstore(files: Sequence[Path], host: str, port: int, called_ae: str = "CT_EDGE",
                  calling_ae: str = "CT_REPLAY", rate: Optional[float] = None, associations: int = 1,
                  retry_delay_s: float = 0.2, max_retries: int = 200, timeout_s: float = 30.0,
                  ssl_context=None) -> ReplayReport:
    """C-STORE every file to ``called_ae@host:port`` over ``associations`` concurrent associations."""
    files = [Path(f) for f in files]
    pacer = RatePacer(rate)
    shares = [files[i::associations] for i in range(max(1, associations))]
    reports = [ReplayReport() for _ in shares]
    errors: List[BaseException] = []

    def run(share, report):
        try:
            _send_share(share, report, host, port, called_ae, calling_ae, pacer, retry_delay_s, max_retries,
                        timeout_s, ssl_context)
        except BaseException as e:  # surfaced after join
            errors.append(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(s, r), name=f"replay-{i}") for i, (s, r) in enumerate(zip(shares, reports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = ReplayReport()
    for r in reports:
        total.merge(r)
    total.elapsed_s = time.monotonic() - t0
    if errors:
        raise errors[0]
    return total


def _contexts_for(files: Sequence[Path]) -> List[Tuple[str, List[str]]]:
    """(SOP class, [transfer syntax]) pairs the files need, for the association request."""
    import pydicom

    wanted: Dict[str, set] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"])
            meta = getattr(ds, "file_meta", None)
            sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
            ts = str(meta.get("TransferSyntaxUID", "") if meta else "") or "1.2.840.10008.1.2"
        except Exception:  # unreadable files are reported when sent
            continue
        if sop_class:
            wanted.setdefault(sop_class, set()).add(ts)
    return [(c, sorted(ts)) for c, ts in sorted(wanted.items())]


def _send_share(files, report, host, port, called_ae, calling_ae, pacer, retry_delay_s, max_retries, timeout_s,
                ssl_context) -> None:
    from pynetdicom import AE

    if not files:
        return
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntaxes in _contexts_for(files):
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = (ssl_context, host) if ssl_context is not None else None

    def connect():
        for attempt in range(max_retries + 1):
            assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
            if assoc.is_established:
                return assoc
            if assoc.is_rejected and attempt < max_retries:  # e.g. too many associations: retry later
                report.retries += 1
                time.sleep(retry_delay_s)
                continue
            break
        raise ConnectionError(f"{called_ae}@{host}:{port} did not accept an association from {calling_ae}")

    assoc = connect()
    try:
        for path in files:
            pacer.wait()
            for attempt in range(max_retries + 1):
                if not assoc.is_established:
                    assoc = connect()
                status = assoc.send_c_store(path)
                code = int(status.Status) if status is not None and "Status" in status else -1
                busy = code != -1 and (code & OUT_OF_RESOURCES_MASK) == OUT_OF_RESOURCES
                dropped = code == -1 and not assoc.is_established  # association lost: reconnect and resend
                if (busy or dropped) and attempt < max_retries:
                    report.retries += 1
                    time.sleep(retry_delay_s)
                    continue
                break
            report.sent += 1
            report.statuses[code] += 1
            if code != 0:
                comment = str(status.get("ErrorComment", "")) if status is not None else "no response"
                report.failures.append((_sop_uid(path), code, comment))
    finally:
        if assoc.is_established:
            assoc.release()


def _sop_uid(path: Path) -> str:
    try:
        return read_header(path).sop_uid
    except DicomError:
        return str(path)
