"""The running runtime picks up a newly installed model between series.

:class:`ModelHandle` resolves the state folder's ``current`` link: its
:meth:`ModelHandle.refresh` opens and activates the version ``current`` points
at when that changed, and only once that worked swaps it in. If the new version
cannot be opened, the old runner stays in service, the failure is logged once
per version and kept in :attr:`ModelHandle.last_error`.

:class:`InstalledModelProvider` is the streaming runtime's
:class:`~edge.ingest.pipeline.ModelProvider` over a handle
(``model.update_state_dir``): the pipeline asks it for a newer model before it
opens a series and while it is idle; the new version loads in a background
thread, so frames keep arriving into the spool and the pipeline's queues
meanwhile, and series keep being processed by the model in service. Each series
keeps the model it opened with to its close; a replaced runner is released
when the last series using it closes.
"""

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

from edge.backends.base import Runner
from edge.detector import SeriesDetector
from edge.errors import EdgeError
from edge.ingest.pipeline import ModelProvider, ServedModel
from edge.model_file import ModelSpecs
from edge.update.installer import CURRENT
from edge.update.manifest import MANIFEST_NAME, parse_manifest
from edge.update.prepare import PreparedModel, open_prepared

log = logging.getLogger(__name__)


class ModelHandle:
    """The model in service, re-resolved from ``<state_dir>/current`` between series.

    ``owns_runners``: deactivate a replaced runner at the switch and the last one
    at :meth:`close`; when False the caller releases every runner it was given.
    """

    def __init__(self, state_dir, open_version: Callable[[Path], PreparedModel] = open_prepared,
                 batch_size: int = 4, owns_runners: bool = True):
        self.link = Path(state_dir) / CURRENT
        self.open_version = open_version
        self.batch_size = batch_size
        self.owns_runners = owns_runners
        self.version: Optional[str] = None  # version folder name in service
        self.runner: Optional[Runner] = None
        self.specs: Optional[ModelSpecs] = None
        self.info: Dict[str, str] = {}  # what a result records about the model in service
        self.last_error: Optional[str] = None
        self._target: Optional[str] = None
        self._failed_target: Optional[str] = None
        self._detector: Optional[SeriesDetector] = None

    def _resolve(self) -> Optional[str]:
        if not self.link.is_symlink():
            return None
        target = os.path.realpath(self.link)
        return target if os.path.isdir(target) else None

    def has_update(self) -> bool:
        """Whether :meth:`refresh` has something to do (cheap: reads the link only)."""
        target = self._resolve()
        if target is None:
            return self.runner is None
        if target == self._target:
            return self._failed_target is not None  # rolled back to the version in service: clear the error
        return target != self._failed_target

    def refresh(self) -> bool:
        """Call between series: switch to the version ``current`` points at if it changed. True if switched."""
        target = self._resolve()
        if target is None:
            if self.runner is None:
                raise EdgeError(f"no model installed: {self.link} does not point at a version (run edge update apply)")
            return False
        if target == self._target:
            self._failed_target = self.last_error = None
            return False
        if target == self._failed_target:
            return False
        try:
            prepared = self.open_version(Path(target))
            runner = prepared.open_runner().activate()
        except Exception as e:  # a bad new version must never take the running runtime down
            self._failed_target = target
            self.last_error = f"cannot load {os.path.basename(target)}: {e}"
            if self.runner is None:
                raise EdgeError(self.last_error) from None
            log.error("%s; staying on %s", self.last_error, self.version)
            return False
        old = self.runner
        self.runner, self.specs, self._target = runner, prepared.specs, target
        self.version = os.path.basename(target)
        self.info = _version_info(Path(target), prepared.specs)
        self._failed_target, self.last_error, self._detector = None, None, None
        if old is not None and self.owns_runners:
            old.deactivate()
        log.info("model %s in service", self.version)
        return True

    def detector(self) -> SeriesDetector:
        """A detector over the runner in service (made once per version)."""
        if self.runner is None:
            self.refresh()
        if self._detector is None:
            self._detector = SeriesDetector(self.runner, self.specs, batch_size=self.batch_size)
        return self._detector

    def close(self) -> None:
        if self.runner is not None and self.owns_runners:
            self.runner.deactivate()
        self.runner = self._detector = None
        self._target = self.version = None

    def __enter__(self):
        self.refresh()
        return self

    def __exit__(self, *exc):
        self.close()


def _version_info(folder: Path, specs: ModelSpecs) -> Dict[str, str]:
    """Model name, version and release from the version's signed manifest (the model card without one)."""
    try:
        m = parse_manifest((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
        return {"name": m.model, "version": m.version, "release": str(m.release), "installed": folder.name}
    except (OSError, EdgeError):
        card = specs.card or {}
        return {"name": str(card.get("name", "")), "version": str(card.get("version", "")), "installed": folder.name}


class InstalledModelProvider(ModelProvider):
    """The model ``edge update apply`` made current, for the streaming pipeline (see the module docstring).

    Opening it loads the current version at once (EdgeError when there is none or
    it cannot be loaded: nothing could be served).
    """

    def __init__(self, state_dir, open_version: Callable[[Path], PreparedModel] = open_prepared):
        self.handle = ModelHandle(state_dir, open_version, owns_runners=False)
        self.handle.refresh()
        self._model = self._serve()
        self._lock = threading.Lock()
        self._loader: Optional[threading.Thread] = None
        self._closed = False

    def _serve(self) -> ServedModel:
        h = self.handle
        return ServedModel(h.runner, h.specs, h.info, on_unused=Runner.deactivate)

    def current(self) -> ServedModel:
        with self._lock:
            return self._model

    def refresh(self) -> None:
        """Start loading the version ``current`` points at if it is new; returns at once."""
        with self._lock:
            if self._closed or self.loading or not self.handle.has_update():
                return
            self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._loader.start()

    @property
    def loading(self) -> bool:
        return self._loader is not None and self._loader.is_alive()

    def _load(self) -> None:
        try:
            switched = self.handle.refresh()
        except Exception:  # e.g. the link vanished; the model in service stays
            log.exception("looking for a new model in %s failed", self.handle.link.parent)
            return
        if not switched:
            return
        new = self._serve()
        with self._lock:
            if self._closed:  # closed while loading: never served
                retired = new
            else:
                retired, self._model = self._model, new
        retired.release()  # deactivated now, or when the last series using it closes

    def wait_loaded(self, timeout: Optional[float] = None) -> bool:
        """Wait for a load in progress; False if it is still running after ``timeout``."""
        loader = self._loader
        if loader is not None:
            loader.join(timeout)
        return not self.loading

    @property
    def version(self) -> Optional[str]:
        """The installed version folder whose model new series get."""
        return self.current().info.get("installed")

    @property
    def error(self) -> Optional[str]:
        return self.handle.last_error

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            model = self._model
        model.release()
