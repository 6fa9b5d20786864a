"""Series assembly: instances of one series, arriving in any order, into a streaming detector in slice order.

Ordering rule (InstanceNumber continuity, with a reorder timeout):

* Scanners number the images of a series along the table, so the run is
  InstanceNumber 1, 2, 3, ... and an instance is pushed to the
  :class:`~edge.ingest.streaming.StreamingSeriesDetector` when every lower
  number has been pushed. Arrivals ahead of their turn wait (their planes only).
* The run starts at the lowest number seen once that is <= 1, or once
  ``reorder_timeout_s`` has passed since the series' first arrival.
* A missing number (never sent, rejected, a localizer sent elsewhere) is skipped
  when the oldest waiting instance has waited ``reorder_timeout_s``, or at once
  when more than ``max_pending`` instances wait (memory stays bounded).
* Localizer instances are dropped; their number counts as seen.
* The slice positions along the normal must follow the InstanceNumber run
  (the detector checks every push). When they do not -- InstanceNumber missing
  or repeated, an instance arriving after its number was skipped, positions out
  of order -- the series falls back to *reorder at close*: nothing more is
  streamed, and at close every slice is re-read (``reload``, from the spool) and
  run in order of position, exactly as the offline detector would. Findings
  streamed before the fallback are superseded by the re-run.
* An instance whose frames have another size or orientation than the series is
  rejected alone, with the reason; the series goes on.

A series is closed by the caller (idle timeout, drain, end of input):
:meth:`SeriesAssembly.close` returns a :class:`SeriesOutcome` with every finding,
the analysed frames in slice order, and the instances to mark processed or rejected.
"""

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from edge.decode.findings import Finding
from edge.errors import EdgeError
from edge.geometry import SliceGeometry
from edge.ingest.streaming import SliceOrderError, StreamingSeriesDetector

LOCALIZER_REASON = "localizer (scout) image, not part of the axial series"

# reload(path) -> {frame_index: planes} for the non-localizer frames of the instance stored at path.
Reloader = Callable[[str], Dict[int, np.ndarray]]


@dataclass
class PreparedSlice:
    """One frame of an instance, preprocessed (``planes`` None for a localizer, or once pushed)."""

    frame_index: int
    geometry: SliceGeometry
    planes: Optional[np.ndarray]
    is_localizer: bool = False


@dataclass
class PreparedInstance:
    """A received instance after decoding and preprocessing, on its way to the series assembly.

    An instance with no analysable slice (a localizer, or one rejected after decoding)
    still comes here so that its InstanceNumber is known to have arrived.
    """

    key: str
    sop_uid: str
    study_uid: str
    series_uid: str
    instance_number: Optional[int]
    slices: List[PreparedSlice]
    path: Optional[str] = None
    received_at: Optional[float] = None  # time.perf_counter() at receipt
    preparation: Optional[tuple] = None  # what the planes were made for (the pipeline's ServedModel.preparation)

    @property
    def analysable(self) -> List[PreparedSlice]:
        return sorted((s for s in self.slices if not s.is_localizer), key=lambda s: s.frame_index)


@dataclass(frozen=True)
class Member:
    """One analysed frame of a series result."""

    key: str
    sop_uid: str
    frame_index: int
    instance_number: Optional[int]
    location: float
    path: Optional[str]


@dataclass
class SeriesOutcome:
    """A closed series: what to commit."""

    study_uid: str
    series_uid: str
    findings: List[Finding]
    members: List[Member]  # analysed frames, in slice order
    processed_keys: List[str]
    rejected: List[Tuple[str, str]]  # (key, reason) rejected at series level
    closed_reason: str
    streamed: bool  # False: the series was re-run in position order at close
    fallback_reason: str = ""
    gaps_skipped: int = 0
    completed_at_close: List[Finding] = field(default_factory=list)  # not streamed before the close
    model: Dict[str, str] = field(default_factory=dict)  # the model that processed the series (name, version, ...)
    report_threshold: Optional[float] = None  # that model's decode spec's report_threshold

    def member_near(self, location: float) -> Optional[Member]:
        """The analysed frame closest to a slice location (a finding's key slice)."""
        if not self.members:
            return None
        return min(self.members, key=lambda m: abs(m.location - location))


@dataclass
class _Record:
    key: str
    sop_uid: str
    instance_number: Optional[int]
    path: Optional[str]
    slices: List[PreparedSlice]  # analysable only
    received_at: Optional[float]


@dataclass
class _State:
    pending: Dict[int, PreparedInstance] = field(default_factory=dict)
    pending_since: Dict[int, float] = field(default_factory=dict)
    seen_numbers: Set[int] = field(default_factory=set)
    skipped: Set[int] = field(default_factory=set)
    next_number: Optional[int] = None


class SeriesAssembly:
    """Orders one series' instances and streams them into a detector; see the module docstring."""

    def __init__(self, study_uid: str, series_uid: str, make_detector: Callable[[], StreamingSeriesDetector], *,
                 reorder_timeout_s: float = 2.0, max_pending: int = 64, min_slices: int = 1,
                 reload: Optional[Reloader] = None, clock: Callable[[], float] = time.monotonic):
        self.study_uid = study_uid
        self.series_uid = series_uid
        self._make_detector = make_detector
        self.reorder_timeout_s = float(reorder_timeout_s)
        self.max_pending = max(1, int(max_pending))
        self.min_slices = max(1, int(min_slices))
        self._reload = reload
        self._clock = clock
        self._records: Dict[str, _Record] = {}
        self._rejected: Dict[str, str] = {}
        self._state = _State()
        self._detector: Optional[StreamingSeriesDetector] = None
        self._members: List[Member] = []
        self._findings: List[Finding] = []
        self._streaming = True
        self._fallback_reason = ""
        self._gaps = 0
        self._first_arrival: Optional[float] = None
        self.last_arrival: Optional[float] = None
        self._closed = False

    # --- state

    @property
    def streaming(self) -> bool:
        return self._streaming

    @property
    def fallback_reason(self) -> str:
        return self._fallback_reason

    @property
    def n_instances(self) -> int:
        return len(self._records)

    @property
    def n_pending(self) -> int:
        return len(self._state.pending)

    # --- input

    def add(self, instance: PreparedInstance, now: Optional[float] = None) -> List[Finding]:
        """Take one instance; returns findings completed by what this made possible."""
        if self._closed:
            raise RuntimeError(f"series {self.series_uid} is closed")
        now = self._clock() if now is None else now
        self.last_arrival = now
        if self._first_arrival is None:
            self._first_arrival = now
        if instance.key in self._records or instance.key in self._rejected:
            return []
        analysable = instance.analysable
        n = instance.instance_number
        if not analysable:  # a localizer or an instance rejected upstream: its number has arrived
            if n is not None:
                self._state.seen_numbers.add(n)
                self._state.skipped.add(n)
            return self._emit(self._advance(now)) if self._streaming else []
        self._records[instance.key] = _Record(instance.key, instance.sop_uid, n, instance.path, analysable,
                                              instance.received_at)
        if not self._streaming:
            self._keep_for_rerun(instance)
            return []
        if n is None:
            return self._fall_back(f"instance {instance.sop_uid} has no InstanceNumber")
        state = self._state
        if n in state.seen_numbers or (state.next_number is not None and n < state.next_number):
            return self._fall_back(f"InstanceNumber {n} arrived twice or after its turn")
        state.seen_numbers.add(n)
        state.pending[n] = instance
        state.pending_since[n] = now
        return self._emit(self._advance(now))

    def poll(self, now: Optional[float] = None) -> List[Finding]:
        """Time-based progress (start of the run, skipping a gap); call it regularly."""
        if self._closed or not self._streaming:
            return []
        return self._emit(self._advance(self._clock() if now is None else now))

    def run_ready(self) -> List[Finding]:
        """Infer slices that are ready now even if that makes a partial batch (call when idle)."""
        if self._closed or not self._streaming or self._detector is None:
            return []
        return self._emit(self._detector.run_ready())

    def idle_for(self, now: Optional[float] = None) -> float:
        now = self._clock() if now is None else now
        return 0.0 if self.last_arrival is None else now - self.last_arrival

    def close(self, reason: str = "end", now: Optional[float] = None) -> SeriesOutcome:
        """End of the series: everything left is inferred; returns what to commit."""
        if self._closed:
            raise RuntimeError(f"series {self.series_uid} is already closed")
        now = self._clock() if now is None else now
        streamed_before = len(self._findings)
        if self._streaming:
            self._emit(self._advance(now, force=True))
        if self._streaming:
            if self._detector is not None:
                self._emit(self._detector.close())
            findings, members = self._findings, self._members
            at_close = self._findings[streamed_before:]
        else:
            findings, members = self._rerun()
            at_close = findings
        self._closed = True
        self._detector = None
        processed = [k for k in self._records if k not in self._rejected]
        rejected = list(self._rejected.items())
        if 0 < len(members) < self.min_slices:
            reason_text = f"series has {len(members)} usable slice(s), at least {self.min_slices} needed"
            rejected += [(k, reason_text) for k in processed]
            processed, findings, members = [], [], []
        return SeriesOutcome(
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            findings=list(findings),
            members=list(members),
            processed_keys=processed,
            rejected=rejected,
            closed_reason=reason,
            streamed=self._streaming,
            fallback_reason=self._fallback_reason,
            gaps_skipped=self._gaps,
            completed_at_close=list(at_close) if findings else [],
        )

    # --- streaming

    def _emit(self, findings: List[Finding]) -> List[Finding]:
        self._findings += findings
        return findings

    def _advance(self, now: float, force: bool = False) -> List[Finding]:
        state = self._state
        if state.next_number is None:
            if not state.seen_numbers:
                return []
            lowest = min(state.seen_numbers)
            if not (force or lowest <= 1 or now - self._first_arrival >= self.reorder_timeout_s):
                return []
            state.next_number = lowest
        findings: List[Finding] = []
        while self._streaming:
            n = state.next_number
            if n in state.skipped:
                state.next_number += 1
                continue
            if n in state.pending:
                instance = state.pending.pop(n)
                del state.pending_since[n]
                state.next_number += 1
                findings += self._push(instance)
                continue
            if not state.pending:
                break
            waited = now - min(state.pending_since.values())
            if force or waited >= self.reorder_timeout_s or len(state.pending) > self.max_pending:
                state.next_number = min(state.pending)  # the missing numbers are given up on
                self._gaps += 1
                continue
            break
        return findings

    def _push(self, instance: PreparedInstance) -> List[Finding]:
        slices = instance.analysable
        if self._detector is None:
            self._detector = self._make_detector()
        try:
            self._detector.check_sequence([s.geometry for s in slices])
        except SliceOrderError as e:
            if e.kind == "geometry":
                self._reject(instance.key, f"does not fit series {self.series_uid}: {e}")
                return []
            return self._fall_back(f"instance {instance.sop_uid}: {e}")
        findings: List[Finding] = []
        for s in slices:
            findings += self._detector.push(s.planes, s.geometry, instance.received_at)
            s.planes = None
            self._members.append(Member(instance.key, instance.sop_uid, s.frame_index, instance.instance_number,
                                        s.geometry.slice_location, instance.path))
        return findings

    def _reject(self, key: str, reason: str) -> None:
        self._rejected[key] = reason
        self._records.pop(key, None)

    # --- fallback: reorder at close

    def _fall_back(self, reason: str) -> List[Finding]:
        self._streaming = False
        self._fallback_reason = reason
        self._detector = None
        for instance in self._state.pending.values():
            self._keep_for_rerun(instance)
        self._state = _State()
        self._members = []
        return []

    def _keep_for_rerun(self, instance: PreparedInstance) -> None:
        """Planes are re-read at close from the instance's file; without one they are kept."""
        if instance.path is not None and self._reload is not None:
            for s in instance.slices:
                s.planes = None

    def _rerun(self) -> Tuple[List[Finding], List[Member]]:
        entries = [(r, s) for r in self._records.values() for s in r.slices]
        if not entries:
            return [], []
        # the series' geometry is its most common frame size and orientation; other frames do not belong
        def signature(g: SliceGeometry):
            return g.rows, g.columns, tuple(np.round(g.normal, 2))

        reference, _ = Counter(signature(s.geometry) for _, s in entries).most_common(1)[0]
        for r, s in entries:
            if signature(s.geometry) != reference and r.key not in self._rejected:
                self._reject(r.key, f"does not fit series {self.series_uid}: frame size or orientation differs")
        entries = sorted(((r, s) for r, s in entries if r.key not in self._rejected),
                         key=lambda e: e[1].geometry.slice_location)
        detector = self._make_detector()
        findings: List[Finding] = []
        members: List[Member] = []
        cache_key, cache = None, {}
        last_location = None
        for r, s in entries:
            if r.key in self._rejected:
                continue
            loc = s.geometry.slice_location
            if last_location is not None and abs(loc - last_location) < 1e-3:
                self._reject(r.key, f"duplicate slice location {loc:.3f} mm in series {self.series_uid}")
                continue
            planes = s.planes
            if planes is None:
                if cache_key != r.key:
                    cache_key, cache = r.key, self._reload_planes(r)
                planes = cache.get(s.frame_index)
                if planes is None:
                    if r.key not in self._rejected:
                        self._reject(r.key, "could not be re-read to order the series by slice position")
                    continue
            findings += detector.push(planes, s.geometry, r.received_at)
            members.append(Member(r.key, r.sop_uid, s.frame_index, r.instance_number, loc, r.path))
            last_location = loc
        findings += detector.close()
        # an instance rejected after some of its frames were pushed (a duplicate location) is not a member
        members = [m for m in members if m.key not in self._rejected]
        return findings, members

    def _reload_planes(self, record: _Record) -> Dict[int, np.ndarray]:
        if record.path is None or self._reload is None:
            return {}
        try:
            return self._reload(record.path)
        except EdgeError:
            return {}
