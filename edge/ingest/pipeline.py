"""The streaming pipeline: bounded queues and worker threads from received instances to committed series.

Stages, each with its own bounded queue and workers::

    submit ─> [decode] ─> [preprocess] ─> [infer: series assembly + streaming detector] ─> [output]

* Admission: a source must hold one of ``max_in_flight`` slots before it
  submits an instance (:meth:`Pipeline.try_admit` for the SCP, which answers
  "out of resources" when none is free; :meth:`Pipeline.admit` blocks, for
  replay and recovery). The slot is given back once the instance has left the
  preprocess stage. The later queues are bounded too and their puts block, so a
  slow inference stage fills the earlier queues and admission fails: memory
  stays bounded (``max_in_flight`` decoded instances, ``infer_queue`` preprocessed
  ones, ``max_pending_per_series`` waiting for their turn in each of at most
  ``max_open_series`` series), and nothing is dropped.
* decode: instances not decoded by their source (spool replay) are read here.
* preprocess: each frame once, into the model's input dtype; localizers marked.
* infer: one thread owns every open :class:`~edge.ingest.assembly.SeriesAssembly`;
  when its queue is empty it runs ready partial batches (low latency when idle,
  full batches under load) and closes series idle for ``series_idle_s``.
* output: hands each closed series to the sink (ledger commit + outputs).

The model comes from a :class:`ModelProvider` (a fixed one for ``model.path``,
:class:`edge.update.reload.InstalledModelProvider` for ``model.update_state_dir``).
A series takes the provider's current :class:`ServedModel` when it opens and
keeps it to its close, so a series is always processed by one model; the
provider is refreshed before a series opens and every ``_MODEL_POLL_S`` while
the infer stage is idle, never changing an open series' model. A replaced
model's runner is released once no open series uses it (reference count).
Instances preprocessed for another model than their series' (the switch
happened in between) are preprocessed again from their spool file.

Per-stage processing times go to :class:`StageLatency` and the metrics' histograms.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from edge.backends.base import Runner
from edge.config import PipelineConfig
from edge.decode.findings import Finding
from edge.dicom.reader import read_frames
from edge.errors import EdgeError
from edge.frame import CTFrame
from edge.ingest.assembly import LOCALIZER_REASON, PreparedInstance, PreparedSlice, SeriesAssembly, SeriesOutcome
from edge.ingest.streaming import StreamingSeriesDetector
from edge.metrics import RuntimeMetrics
from edge.model_file import ModelSpecs
from edge.preprocess.cpu import CpuPreprocessor
from edge.preprocess.spec import PreprocessSpec

log = logging.getLogger(__name__)

_STOP = object()
_IDLE_TICK_S = 0.02
_MODEL_POLL_S = 0.5  # how often the idle infer stage asks the provider for a newer model


@dataclass
class Instance:
    """A received instance entering the pipeline. ``frames`` when the source already decoded it."""

    key: str
    source: str
    path: Optional[str] = None
    frames: Optional[List[CTFrame]] = None
    received_at: float = 0.0  # time.perf_counter()


class ServedModel:
    """A model in service: runner, specs and what to record about it (``info``: name, version, ...).

    Reference counted: whoever hands it out holds one reference from creation,
    each open series one more (:meth:`acquire`); the last :meth:`release` calls
    ``on_unused(runner)`` (e.g. ``Runner.deactivate``).
    """

    def __init__(self, runner: Runner, specs: ModelSpecs, info: Optional[Dict[str, str]] = None,
                 on_unused: Optional[Callable[[Runner], None]] = None):
        self.runner = runner
        self.specs = specs
        self.info = dict(info or {})
        self.input_dtype = np.dtype(next(iter(runner.input_metadata().values())).dtype)
        self._on_unused = on_unused
        self._users = 1
        self._lock = threading.Lock()

    @property
    def preparation(self) -> Tuple[PreprocessSpec, str]:
        """What the preprocess stage made planes for: equal values mean interchangeable planes."""
        return self.specs.preprocess, self.input_dtype.str

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> "ServedModel":
        with self._lock:
            if self._users == 0:
                raise RuntimeError(f"model {self.describe()} was already released")
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                raise RuntimeError(f"model {self.describe()} released more often than acquired")
            self._users -= 1
            unused = self._users == 0
        if unused and self._on_unused is not None:
            self._on_unused(self.runner)

    def describe(self) -> str:
        return " ".join(v for v in (self.info.get("name", ""), self.info.get("version", "")) if v) or "model"


class ModelProvider:
    """Where the pipeline takes the model of each new series from."""

    def current(self) -> ServedModel:
        """The model in service now; a series keeps it with :meth:`ServedModel.acquire`."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Look for a newer model; must return at once (a new model loads in the background)."""

    @property
    def error(self) -> Optional[str]:
        """Why the newest model is not in service, or None."""
        return None

    def close(self) -> None:
        """Give up the provider's reference on the model in service."""


class FixedModelProvider(ModelProvider):
    """Always the same model (``model.path``); ``owned``: deactivate the runner once it is unused."""

    def __init__(self, runner: Runner, specs: ModelSpecs, info: Optional[Dict[str, str]] = None,
                 owned: bool = False):
        if info is None:
            card = specs.card or {}
            info = {"name": str(card.get("name", "")), "version": str(card.get("version", ""))}
        self._model = ServedModel(runner, specs, info, on_unused=Runner.deactivate if owned else None)
        self._closed = False

    def current(self) -> ServedModel:
        return self._model

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._model.release()


class PipelineSink:
    """Where the pipeline's results go (the service's is :class:`edge.ingest.results.ResultStore`)."""

    def reject(self, instance: Instance, reason: str, stage: str) -> None:
        """An instance that will not be analysed (final)."""

    def finding(self, study_uid: str, series_uid: str, finding: Finding) -> None:
        """A finding, as soon as the aggregator completes it (informational; the commit is final)."""

    def commit(self, outcome: SeriesOutcome) -> None:
        """A closed series (final)."""


class StageLatency:
    """Recent per-item processing times by stage (bounded), for percentiles; also feeds the histogram."""

    def __init__(self, metrics: Optional[RuntimeMetrics] = None, keep: int = 20000):
        self._samples: Dict[str, deque] = defaultdict(lambda: deque(maxlen=keep))
        self._lock = threading.Lock()
        self._metrics = metrics

    def record(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._samples[stage].append(seconds)
        if self._metrics is not None:
            self._metrics.stage_latency.observe(seconds, stage=stage)

    def summary(self) -> Dict[str, Dict[str, float]]:
        """{stage: {n, p50_ms, p99_ms, mean_ms}} over the kept samples."""
        with self._lock:
            data = {k: np.asarray(v, float) for k, v in self._samples.items() if v}
        return {
            k: {
                "n": int(v.size),
                "p50_ms": float(np.percentile(v, 50) * 1e3),
                "p99_ms": float(np.percentile(v, 99) * 1e3),
                "mean_ms": float(v.mean() * 1e3),
            }
            for k, v in sorted(data.items())
        }


class Pipeline:
    """See the module docstring. Pass ``runner`` and ``specs`` (one fixed model, not deactivated here),
    or ``provider`` with both None."""

    def __init__(self, runner: Optional[Runner], specs: Optional[ModelSpecs], settings: PipelineConfig,
                 sink: PipelineSink, metrics: Optional[RuntimeMetrics] = None, batch_size: int = 4,
                 clock: Callable[[], float] = time.monotonic, provider: Optional[ModelProvider] = None):
        if provider is None:
            if runner is None or specs is None:
                raise ValueError("pass runner and specs, or a provider")
            provider = FixedModelProvider(runner, specs)
        elif runner is not None or specs is not None:
            raise ValueError("pass runner and specs, or a provider, not both")
        self.provider = provider
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.batch_size = batch_size
        self.clock = clock
        self.latency = StageLatency(metrics)
        self._slots = threading.Semaphore(settings.max_in_flight)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._decode_q: "queue.Queue" = queue.Queue(settings.max_in_flight)
        self._preprocess_q: "queue.Queue" = queue.Queue(settings.max_in_flight)
        self._infer_q: "queue.Queue" = queue.Queue(settings.infer_queue)
        self._output_q: "queue.Queue" = queue.Queue(settings.output_queue)
        self._series: Dict[tuple, SeriesAssembly] = {}
        self._series_model: Dict[tuple, ServedModel] = {}  # the model each open series keeps to its close
        self._last_model_poll = float("-inf")  # on ``clock``
        self._series_lock = threading.Lock()  # guards the dict for readers outside the infer thread
        self._threads: List[threading.Thread] = []
        self._busy = defaultdict(int)  # items being worked on, by stage
        self._busy_lock = threading.Lock()
        self._close_requested = threading.Event()
        self._closed_all = threading.Event()
        self._started = False
        self.errors: List[str] = []
        if metrics is not None:
            metrics.on_scrape(self._refresh_gauges)

    @property
    def runner(self) -> Runner:
        """The runner of the model in service (series already open may still use an older one)."""
        return self.provider.current().runner

    @property
    def specs(self) -> ModelSpecs:
        return self.provider.current().specs

    # --- lifecycle

    def start(self) -> "Pipeline":
        if self._started:
            return self
        self._started = True
        s = self.settings
        self._spawn("decode", s.decode_workers, self._decode_loop)
        self._spawn("preprocess", s.preprocess_workers, self._preprocess_loop)
        self._spawn("infer", 1, self._infer_loop)
        self._spawn("output", 1, self._output_loop)
        return self

    def _spawn(self, name: str, count: int, target) -> None:
        for i in range(count):
            t = threading.Thread(target=self._guard(name, target), name=f"pipeline-{name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _guard(self, name, target):
        def run():
            try:
                target()
            except Exception as e:  # a bug in a stage: keep it visible, it would stall the pipeline
                log.exception("pipeline stage %s failed", name)
                self.errors.append(f"{name}: {type(e).__name__}: {e}")

        return run

    # --- admission and input

    def try_admit(self) -> bool:
        """Take an admission slot if one is free (the SCP answers "out of resources" otherwise)."""
        if not self._slots.acquire(blocking=False):
            return False
        self._count_in_flight(+1)
        return True

    def admit(self, timeout: Optional[float] = None) -> bool:
        """Wait for an admission slot; False on timeout."""
        if not self._slots.acquire(timeout=timeout):
            return False
        self._count_in_flight(+1)
        return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`try_admit` / :meth:`admit` without submitting."""
        self._count_in_flight(-1)
        self._slots.release()

    def _count_in_flight(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, instance: Instance) -> None:
        """Queue an admitted instance (the caller holds a slot, which the pipeline gives back)."""
        self._decode_q.put_nowait(instance)  # never full: its size is the number of slots

    # --- stages

    def _work(self, stage: str, delta: int) -> None:
        with self._busy_lock:
            self._busy[stage] += delta

    def _decode_loop(self) -> None:
        while True:
            item = self._decode_q.get()
            if item is _STOP:
                return
            self._work("decode", +1)
            try:
                if item.frames is None:
                    t0 = time.perf_counter()
                    try:
                        item.frames = read_frames(item.path)
                    except EdgeError as e:
                        self._reject(item, getattr(e, "reason", str(e)), "decode")
                        self.release()
                        continue
                    self.latency.record("decode", time.perf_counter() - t0)
                self._preprocess_q.put(item)
            finally:
                self._work("decode", -1)

    def _preprocess_loop(self) -> None:
        preparation, preprocessor = None, None
        while True:
            item = self._preprocess_q.get()
            if item is _STOP:
                return
            self._work("preprocess", +1)
            try:
                model = self.provider.current()  # planes for the model in service; see _add for a switch
                if model.preparation != preparation:
                    preparation, preprocessor = model.preparation, CpuPreprocessor(model.specs.preprocess)
                prepared = self._prepare(item, preprocessor, model)
                if prepared is not None:
                    self._infer_q.put(prepared)  # blocks when inference is behind: backpressure
                self.release()
            finally:
                self._work("preprocess", -1)

    def _prepare(self, item: Instance, preprocessor: CpuPreprocessor, model: ServedModel) -> Optional[PreparedInstance]:
        frames = item.frames
        first = frames[0]
        slices: List[PreparedSlice] = []
        spec = model.specs.preprocess
        shape = (len(spec.windows), spec.out_height, spec.out_width)
        t0 = time.perf_counter()
        try:
            for f in frames:
                if f.is_localizer:
                    slices.append(PreparedSlice(f.frame_index, f.geometry, None, is_localizer=True))
                    continue
                planes = preprocessor.preprocess_frame(f, out=np.empty(shape, model.input_dtype))
                slices.append(PreparedSlice(f.frame_index, f.geometry, planes))
        except EdgeError as e:
            self._reject(item, getattr(e, "reason", str(e)), "preprocess")
            slices = []
        else:
            n = sum(not s.is_localizer for s in slices)
            if n:
                self.latency.record("preprocess", (time.perf_counter() - t0) / n)
            else:
                self._reject(item, LOCALIZER_REASON, "preprocess")
        item.frames = None  # the decoded pixels are not needed any more
        return PreparedInstance(
            key=item.key,
            sop_uid=first.sop_uid,
            study_uid=first.study_uid,
            series_uid=first.series_uid,
            instance_number=first.instance_number,
            slices=slices,
            path=item.path,
            received_at=item.received_at,
            preparation=model.preparation,
        )

    def _reject(self, item: Instance, reason: str, stage: str) -> None:
        try:
            self.sink.reject(item, reason, stage)
        except Exception:
            log.exception("could not record the rejection of %s", item.key)

    def _infer_loop(self) -> None:
        while True:
            try:
                item = self._infer_q.get(timeout=_IDLE_TICK_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            self._work("infer", +1)
            try:
                now = self.clock()
                if item is not None:
                    self._add(item, now)
                if self._infer_q.empty():
                    self._idle_work(now)
                if self._close_requested.is_set() and self._infer_q.empty() and self._upstream_empty():
                    self._close_series(lambda a: True, "drain")
                    self._close_requested.clear()
                    self._closed_all.set()
            finally:
                self._work("infer", -1)

    def _upstream_empty(self) -> bool:
        with self._busy_lock:
            busy = self._busy["decode"] + self._busy["preprocess"]
        return busy == 0 and self._decode_q.empty() and self._preprocess_q.empty() and self._in_flight == 0

    def _assembly(self, item: PreparedInstance) -> Tuple[SeriesAssembly, ServedModel]:
        key = (item.study_uid, item.series_uid)
        assembly = self._series.get(key)
        if assembly is None:
            if len(self._series) >= self.settings.max_open_series:
                oldest = min(self._series.values(), key=lambda a: a.last_arrival or 0.0)
                self._close_series(lambda a: a is oldest, "max_open_series")
            self._refresh_model()
            model = self.provider.current().acquire()  # kept until the series closes
            assembly = SeriesAssembly(
                item.study_uid, item.series_uid, lambda: self._make_detector(model),
                reorder_timeout_s=self.settings.reorder_timeout_s,
                max_pending=self.settings.max_pending_per_series,
                min_slices=self.settings.min_slices, reload=lambda path: self._reload(model, path), clock=self.clock,
            )
            with self._series_lock:
                self._series[key] = assembly
                self._series_model[key] = model
        return assembly, self._series_model[key]

    def _refresh_model(self) -> None:
        self._last_model_poll = self.clock()
        try:
            self.provider.refresh()
        except Exception:  # looking for a new model must never stop the series in progress
            log.exception("looking for a new model failed")

    def _make_detector(self, model: ServedModel) -> StreamingSeriesDetector:
        return StreamingSeriesDetector(model.runner, model.specs, self.batch_size, record=self.latency.record)

    def _reload(self, model: ServedModel, path: str) -> Dict[int, np.ndarray]:
        """Planes, for ``model``, of the analysable frames of a spooled instance (series re-run in
        position order, or an instance preprocessed for another model)."""
        preprocessor = CpuPreprocessor(model.specs.preprocess)
        spec = model.specs.preprocess
        shape = (len(spec.windows), spec.out_height, spec.out_width)
        return {
            f.frame_index: preprocessor.preprocess_frame(f, out=np.empty(shape, model.input_dtype))
            for f in read_frames(path)
            if not f.is_localizer
        }

    def _add(self, item: PreparedInstance, now: float) -> None:
        assembly, model = self._assembly(item)
        if item.preparation != model.preparation and item.analysable:
            item = self._prepare_again(item, model)
        self._emit(assembly, assembly.add(item, now))

    def _prepare_again(self, item: PreparedInstance, model: ServedModel) -> PreparedInstance:
        """Planes made for another model than the series' (a switch in between): made again from the spool."""
        planes: Dict[int, np.ndarray] = {}
        reason = "preprocessed for a model that was replaced, and it has no spool file to read again"
        if item.path is not None:
            try:
                planes = self._reload(model, item.path)
            except EdgeError as e:
                reason = f"could not be read again for model {model.describe()}: {getattr(e, 'reason', e)}"
        slices = []
        for s in item.slices:
            if not s.is_localizer:
                s.planes = planes.get(s.frame_index)
                if s.planes is None:
                    self._reject(Instance(key=item.key, source="", path=item.path), reason, "preprocess")
                    return dataclasses.replace(item, slices=[], preparation=model.preparation)
            slices.append(s)
        return dataclasses.replace(item, slices=slices, preparation=model.preparation)

    def _idle_work(self, now: float) -> None:
        if now - self._last_model_poll >= _MODEL_POLL_S and not self._close_requested.is_set():
            self._refresh_model()
        for assembly in list(self._series.values()):
            self._emit(assembly, assembly.poll(now))
            self._emit(assembly, assembly.run_ready())
        idle = self.settings.series_idle_s
        self._close_series(lambda a: a.idle_for(now) >= idle, "idle")

    def _emit(self, assembly: SeriesAssembly, findings: List[Finding]) -> None:
        for f in findings:
            try:
                self.sink.finding(assembly.study_uid, assembly.series_uid, f)
            except Exception:
                log.exception("finding hook failed")

    def _close_series(self, which, reason: str) -> None:
        for key, assembly in list(self._series.items()):
            if not which(assembly):
                continue
            with self._series_lock:
                del self._series[key]
                model = self._series_model.pop(key)
            t0 = time.perf_counter()
            try:
                outcome = assembly.close(reason)
            except EdgeError as e:  # e.g. the model cannot run this series' input
                log.error("series %s could not be completed: %s", assembly.series_uid, e)
                continue
            finally:
                model.release()
            outcome.model = dict(model.info)
            outcome.report_threshold = model.specs.decode.report_threshold
            self.latency.record("close", time.perf_counter() - t0)
            self._emit(assembly, outcome.completed_at_close)
            self._output_q.put(outcome)

    def _output_loop(self) -> None:
        while True:
            outcome = self._output_q.get()
            if outcome is _STOP:
                return
            self._work("output", +1)
            try:
                t0 = time.perf_counter()
                try:
                    self.sink.commit(outcome)
                except Exception as e:  # the instances stay 'received' and are replayed at the next start
                    log.exception("commit of series %s failed", outcome.series_uid)
                    self.errors.append(f"commit {outcome.series_uid}: {type(e).__name__}: {e}")
                self.latency.record("output", time.perf_counter() - t0)
            finally:
                self._work("output", -1)

    # --- draining

    @property
    def open_series(self) -> int:
        return len(self._series)

    def queue_depths(self) -> Dict[str, int]:
        return {
            "decode": self._decode_q.qsize(),
            "preprocess": self._preprocess_q.qsize(),
            "infer": self._infer_q.qsize(),
            "output": self._output_q.qsize(),
        }

    def is_idle(self) -> bool:
        """Nothing queued, nothing being worked on, no open series."""
        with self._busy_lock:
            busy = sum(self._busy.values())
        return busy == 0 and self._in_flight == 0 and not self._series and not any(self.queue_depths().values())

    def close_all(self, timeout: Optional[float] = None) -> bool:
        """End of input: once every admitted instance has reached its series, close all open
        series and wait until their results are committed. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._closed_all.clear()
        self._close_requested.set()
        if not self._closed_all.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            return False
        while not self.is_idle():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(_IDLE_TICK_S)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers (after :meth:`close_all` for a graceful end)."""
        if not self._started:
            return
        for q, n in ((self._decode_q, self.settings.decode_workers), (self._preprocess_q, self.settings.preprocess_workers)):
            for _ in range(n):
                _put_forced(q, _STOP)
        _put_forced(self._infer_q, _STOP)
        _put_forced(self._output_q, _STOP)
        for t in self._threads:
            t.join(timeout)
        self._started = False
        with self._series_lock:  # series left open (no drain) give up their model
            models, self._series_model = list(self._series_model.values()), {}
            self._series.clear()
        for model in models:
            model.release()

    def _refresh_gauges(self) -> None:
        m = self.metrics
        for name, depth in self.queue_depths().items():
            m.queue_depth.set(depth, queue=name)
        m.open_series.set(self.open_series)
        m.in_flight.set(self._in_flight)


def _put_forced(q: "queue.Queue", item) -> None:
    """Put a stop marker even into a full queue (a worker is draining it)."""
    while True:
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            continue
