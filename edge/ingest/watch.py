"""The watched folder: for scanners that write files instead of pushing them.

Every ``poll_interval_s`` the folder (and its subfolders) is listed. A file is
taken once its size and modification time have not changed for ``stable_s``
(the scanner has finished writing it); names starting with ``.`` or ending in
``.tmp`` / ``.part`` are never taken. Taking a file goes through
:class:`~edge.ingest.intake.Intake` (spooled and fsynced, in the ledger); only
then is the original deleted. When the pipeline is full the file stays where it
is and is tried again at the next poll. Nothing is lost: a crash before the
delete leaves the file in the folder, and taking it again is a duplicate by SOP
Instance UID. Broken files are rejected in the ledger (kept in the quarantine)
and removed from the folder, so they are not retried forever.
"""

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from edge.ingest.intake import BUSY, Intake

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".tmp", ".part", ".partial")


class FolderWatcher:
    """Polls ``folder``; see the module docstring."""

    def __init__(self, folder, intake: Intake, poll_interval_s: float = 1.0, stable_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.folder = Path(folder)
        self.intake = intake
        self.poll_interval_s = poll_interval_s
        self.stable_s = stable_s
        self.clock = clock
        self._seen: Dict[Path, Tuple[int, int, float]] = {}  # path -> (size, mtime_ns, unchanged since)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.taken = 0
        self.folder.mkdir(parents=True, exist_ok=True)

    def _candidates(self):
        for dirpath, dirnames, filenames in os.walk(self.folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name.lower().endswith(_IGNORED_SUFFIXES):
                    continue
                yield Path(dirpath) / name

    def poll_once(self, now: Optional[float] = None) -> int:
        """One pass: take every stable file the pipeline has room for; returns how many were taken."""
        now = self.clock() if now is None else now
        present = set()
        taken = 0
        for path in self._candidates():
            if self._stop.is_set():
                break
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            present.add(path)
            size, mtime = st.st_size, st.st_mtime_ns
            previous = self._seen.get(path)
            if previous is None or previous[:2] != (size, mtime):
                self._seen[path] = (size, mtime, now)
                if self.stable_s > 0:
                    continue
            elif now - previous[2] < self.stable_s:
                continue
            if self._take(path):
                taken += 1
                present.discard(path)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        self.taken += taken
        return taken

    def _take(self, path: Path) -> bool:
        try:
            result = self.intake.offer_file(path, source="watch")
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("watched file cannot be read (%s); will retry", e.strerror or e)
            return False
        if result.outcome == BUSY:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self._seen.pop(path, None)
        return True

    def start(self) -> "FolderWatcher":
        self._thread = threading.Thread(target=self._run, name="watch-folder", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except OSError as e:
                log.error("watched folder cannot be listed: %s", e.strerror or e)
            self._stop.wait(self.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
