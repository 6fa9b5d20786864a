"""The runtime service (``edge serve``): SCP and watched folder -> pipeline -> ledger and outputs.

Start-up, in this order: the ledger and spool are opened; committed results not
yet written out are exported again; the pipeline starts; every spooled instance
without a final ledger state is queued again (a thread, as it may wait for
admission); then the SCP, the watched folder and the metrics endpoint start.

Graceful drain (SIGTERM): stop accepting associations and stop the watcher; let
associations in progress finish (up to ``drain_timeout_s``, then abort them:
their unacknowledged instances are re-sent by the scanner); refuse further
instances; process everything admitted; close every open series and commit it.
Afterwards no instance is left ``received``.

The model: ``model.path`` (fixed for the life of the service), or with
``model.update_state_dir`` the version ``edge update apply`` made current,
picked up between series while the service runs
(:class:`edge.update.reload.InstalledModelProvider`); each series result
records the model that processed it.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from edge.backends.base import Runner
from edge.config import EdgeConfig
from edge.errors import ConfigError, MissingDependencyError
from edge.ingest.intake import Intake
from edge.ingest.ledger import Ledger
from edge.ingest.pipeline import FixedModelProvider, ModelProvider, Pipeline
from edge.ingest.results import ResultStore
from edge.ingest.scp import StorageSCP
from edge.ingest.spool import Spool
from edge.ingest.watch import FolderWatcher
from edge.metrics import MetricsServer, RuntimeMetrics
from edge.model_file import ModelSpecs
from edge.outputs.exporter import SeriesExporter

log = logging.getLogger(__name__)

# Debug logging of pynetdicom prints whole datasets, patient attributes included.
_PHI_LOGGERS = ("pynetdicom",)


def open_runner(config: EdgeConfig) -> Tuple[Runner, ModelSpecs, Path]:
    """The configured backend, activated, with the model's embedded specs."""
    path = config.model_path()
    if config.model.backend == "onnxruntime":
        from edge.backends.onnxruntime_runner import open_onnxruntime_runner

        runner, specs = open_onnxruntime_runner(path, intra_op_threads=config.model.intra_op_threads)
        return runner, specs, path
    try:
        from edge.backends.tensorrt_runner import open_tensorrt_runner  # provided by the GPU path
    except ImportError:
        raise MissingDependencyError(
            f"{config.source}: model.backend 'tensorrt' needs the TensorRT runner and tensorrt/pycuda (Jetson)"
        ) from None
    runner, specs = open_tensorrt_runner(path)
    return runner, specs, path


def open_model_provider(config: EdgeConfig) -> ModelProvider:
    """``model.update_state_dir``'s installed model (re-read between series), else ``model.path``'s."""
    state_dir = config.model.update_state_dir
    if not state_dir:
        runner, specs, _ = open_runner(config)
        return FixedModelProvider(runner, specs, owned=True)
    from edge.update.prepare import open_prepared
    from edge.update.reload import InstalledModelProvider

    backend = config.model.backend

    def open_version(folder):
        prepared = open_prepared(folder)
        if prepared.backend != backend:
            raise ConfigError(f"{config.source}: model.backend is {backend!r} but {Path(folder).name} was prepared "
                              f"for {prepared.backend!r} (set model.backend to match this device)")
        return prepared

    return InstalledModelProvider(state_dir, open_version=open_version)


class EdgeService:
    """See the module docstring. Pass ``runner`` and ``specs`` to use an already opened model (not
    deactivated here), or a ``provider`` (closed with the service); else the config's model is opened."""

    def __init__(self, config: EdgeConfig, runner: Optional[Runner] = None, specs: Optional[ModelSpecs] = None,
                 provider: Optional[ModelProvider] = None):
        if (runner is None) != (specs is None):
            raise ValueError("pass both runner and specs, or neither")
        if runner is not None and provider is not None:
            raise ValueError("pass runner and specs, or a provider, not both")
        self.config = config
        self.provider = FixedModelProvider(runner, specs) if runner is not None else provider
        self.metrics = RuntimeMetrics()
        self.ledger: Optional[Ledger] = None
        self.spool: Optional[Spool] = None
        self.pipeline: Optional[Pipeline] = None
        self.results: Optional[ResultStore] = None
        self.intake: Optional[Intake] = None
        self.scp: Optional[StorageSCP] = None
        self.watcher: Optional[FolderWatcher] = None
        self.metrics_server: Optional[MetricsServer] = None
        self._recovery: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._draining = False
        self._started = False

    # --- lifecycle

    def start(self, receive: bool = True) -> "EdgeService":
        """Start everything; ``receive=False`` starts no SCP or watcher (local replay only)."""
        c = self.config
        for name in _PHI_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        if self.provider is None:
            self.provider = open_model_provider(c)
        self.spool = Spool(c.spool_dir, c.rejected_dir if c.storage.keep_rejected else None)
        self.ledger = Ledger(c.ledger_path)
        exporter = SeriesExporter(c.outputs.dir, jsonl=c.outputs.jsonl, overlays=c.outputs.overlays, sr=c.outputs.sr,
                                  report_threshold=None if c.outputs.report_threshold == "model"
                                  else c.outputs.report_threshold,
                                  pacs=c.outputs.pacs)
        self.results = ResultStore(self.ledger, self.spool, exporter, self.metrics, model=self.model)
        self.pipeline = Pipeline(None, None, c.pipeline, self.results, self.metrics, batch_size=c.model.batch_size,
                                 provider=self.provider)
        self.results.timings = self.pipeline.latency.summary
        exported = self.results.recover()
        if exported:
            log.info("restart: %d committed result(s) written out again", exported)
        self.pipeline.start()
        self.intake = Intake(self.ledger, self.spool, self.pipeline, self.metrics, keep_rejected=c.storage.keep_rejected)
        self._recovery = threading.Thread(target=self.intake.recover, args=(self._stop,), name="spool-recovery",
                                          daemon=True)
        self._recovery.start()
        if receive and c.scp.enabled:
            self.scp = StorageSCP(c.scp, self.intake, self.metrics, source=c.source)
            self.scp.start()
        if receive and c.watch.enabled:
            self.watcher = FolderWatcher(c.watch.folder, self.intake, c.watch.poll_interval_s, c.watch.stable_s).start()
        if c.metrics.enabled:
            try:
                self.metrics_server = MetricsServer(self.metrics, c.metrics.host, c.metrics.port, self.health).start()
            except OSError as e:
                raise ConfigError(f"{c.source}: metrics.port {c.metrics.port} cannot be bound: {e.strerror or e}") from None
        self._started = True
        return self

    def wait_recovered(self, timeout: Optional[float] = None) -> bool:
        """Wait until the spool left by a previous run has been queued again."""
        if self._recovery is None:
            return True
        self._recovery.join(timeout)
        return not self._recovery.is_alive()

    def request_stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Start, serve until :meth:`request_stop`, drain, close. Returns an exit code."""
        if not self._started:
            self.start()
        while not self._stop.wait(0.5):
            pass
        ok = self.drain()
        self.close()
        return 0 if ok else 1

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Stop receiving and finish everything received; False when it did not finish in time."""
        timeout = self.config.pipeline.drain_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._draining = True
        self._stop.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self.scp is not None:
            self.scp.stop_accepting()
            if not self.scp.wait_idle(max(0.0, deadline - time.monotonic())):
                log.warning("drain: aborting associations still open")
                self.scp.abort_all()
        self.intake.closed.set()
        if self._recovery is not None:
            self._recovery.join(max(0.0, deadline - time.monotonic()))
        done = self.pipeline.close_all(max(0.0, deadline - time.monotonic()))
        counts = self.ledger.counts()
        log.info("drained: %d processed, %d rejected, %d still received", counts["processed"], counts["rejected"],
                 counts["received"])
        if not done:
            log.warning("drain did not finish within %.0f s; the rest is replayed at the next start", timeout)
        return done

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.ledger is not None:
            self.ledger.close()
        if self.provider is not None:
            self.provider.close()
            self.provider = None
        self._started = False

    # --- state

    @property
    def runner(self) -> Optional[Runner]:
        """The runner of the model in service (series already open may still use an older one)."""
        return self.provider.current().runner if self.provider is not None else None

    @property
    def specs(self) -> Optional[ModelSpecs]:
        return self.provider.current().specs if self.provider is not None else None

    @property
    def model(self) -> Dict[str, str]:
        """What is recorded about the model in service (name, version, ...)."""
        return dict(self.provider.current().info) if self.provider is not None else {}

    @property
    def scp_port(self) -> int:
        return self.scp.port if self.scp is not None else 0

    def health(self) -> Tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if self.pipeline.errors:
            return False, "pipeline stage failed: " + self.pipeline.errors[0]
        if self._draining:
            return False, "draining"
        counts = self.ledger.counts()
        text = (f"ok: {counts['received']} received, {counts['processed']} processed, "
                f"{counts['rejected']} rejected, {self.pipeline.open_series} open series; "
                f"model {self.provider.current().describe()}")
        error = self.provider.error
        # the model in service still works: report why the newest one is not in service, stay healthy
        return True, text + (f"; model update not in service: {error}" if error else "")
