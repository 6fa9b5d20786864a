"""The running runtime picks up a newly installed model between series.

The runtime owns a :class:`ModelHandle` and calls :meth:`ModelHandle.refresh`
before it starts each series (never during one). ``refresh`` reads where the
state folder's ``current`` link points; when that changed, it opens and
activates the new version's runner, and only once that worked swaps it in and
releases the old one. If the new version cannot be opened, the old runner
stays in service, the failure is logged once per version and kept in
:attr:`ModelHandle.last_error`. Frames keep arriving into the runtime's series
buffer while a model loads, so no frame is lost; a series is always processed
by one model from start to end.
"""

import logging
import os
from pathlib import Path
from typing import Callable, Optional

from edge.backends.base import Runner
from edge.detector import SeriesDetector
from edge.errors import EdgeError
from edge.model_file import ModelSpecs
from edge.update.installer import CURRENT
from edge.update.prepare import PreparedModel, open_prepared

log = logging.getLogger(__name__)


class ModelHandle:
    """The model in service, re-resolved from ``<state_dir>/current`` between series."""

    def __init__(self, state_dir, open_version: Callable[[Path], PreparedModel] = open_prepared,
                 batch_size: int = 4):
        self.link = Path(state_dir) / CURRENT
        self.open_version = open_version
        self.batch_size = batch_size
        self.version: Optional[str] = None  # version folder name in service
        self.runner: Optional[Runner] = None
        self.specs: Optional[ModelSpecs] = None
        self.last_error: Optional[str] = None
        self._target: Optional[str] = None
        self._failed_target: Optional[str] = None
        self._detector: Optional[SeriesDetector] = None

    def _resolve(self) -> Optional[str]:
        if not self.link.is_symlink():
            return None
        target = os.path.realpath(self.link)
        return target if os.path.isdir(target) else None

    def refresh(self) -> bool:
        """Call between series: switch to the version ``current`` points at if it changed. True if switched."""
        target = self._resolve()
        if target is None:
            if self.runner is None:
                raise EdgeError(f"no model installed: {self.link} does not point at a version (run edge update apply)")
            return False
        if target in (self._target, self._failed_target):
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
        self._failed_target, self.last_error, self._detector = None, None, None
        if old is not None:
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
        if self.runner is not None:
            self.runner.deactivate()
        self.runner = self._detector = None
        self._target = self.version = None

    def __enter__(self):
        self.refresh()
        return self

    def __exit__(self, *exc):
        self.close()
