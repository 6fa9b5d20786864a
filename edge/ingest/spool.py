"""The durable spool: each received instance as one file, on disk before it is acknowledged.

:meth:`Spool.write` writes to a temporary file in the spool's own ``.tmp``
folder (same filesystem), fsyncs it, renames it atomically to its final name and
fsyncs the folder, so after it returns the file survives a power cut or kill -9;
a crash before that leaves only a temporary file, which :meth:`Spool.clear_tmp`
removes on the next start (the sender got no success status and sends again).
File names are the SOP Instance UID (UIDs are digits and dots) plus ``.dcm``.
"""

import hashlib
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterator, Optional

_SAFE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")
SUFFIX = ".dcm"


def spool_name(key: str) -> str:
    """The file name of an instance key: the key itself when file-name safe, else its SHA-1."""
    if _SAFE_NAME.fullmatch(key) and key not in (".", ".."):
        return key + SUFFIX
    return "k" + hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest() + SUFFIX


def fsync_dir(path) -> None:
    """Make a rename or unlink in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp_dir: Optional[Path] = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably (tmp + fsync + rename + fsync dir)."""
    path = Path(path)
    tmp_dir = Path(tmp_dir) if tmp_dir is not None else path.parent
    tmp = tmp_dir / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Spool:
    """A folder of received instances waiting to be processed; ``quarantine_dir`` keeps rejected ones."""

    def __init__(self, root, quarantine_dir=None):
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir is not None else None
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        if self.quarantine_dir is not None:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path_for(self, key: str) -> Path:
        return self.root / spool_name(key)

    def write(self, key: str, data: bytes) -> Path:
        """Store an instance's bytes durably under its key; returns the spool path."""
        return write_durably(self.path_for(key), data, self.tmp_dir)

    def remove(self, path) -> None:
        """Forget a processed instance (the unlink need not be durable: the ledger says it is done)."""
        _unlink_quietly(Path(path))

    def quarantine(self, key: str, data: Optional[bytes] = None, path=None) -> Optional[Path]:
        """Keep a rejected instance for inspection: move its spool file, or write ``data``.

        Returns the quarantine path, or None without a quarantine folder (the file is then deleted).
        """
        if self.quarantine_dir is None:
            if path is not None:
                self.remove(path)
            return None
        target = self.quarantine_dir / spool_name(key)
        if path is not None and Path(path).exists():
            os.replace(path, target)
        elif data is not None:
            with open(target, "wb") as f:
                f.write(data)
        else:
            return None
        return target

    def files(self) -> Iterator[Path]:
        """Spooled instance files, oldest first (recovery replays them in arrival order)."""
        entries = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.is_file() and entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                    entries.append((entry.stat().st_mtime_ns, entry.name))
        for _, name in sorted(entries):
            yield self.root / name

    def clear_tmp(self) -> int:
        """Remove temporary files of writes that never completed; returns how many."""
        n = 0
        with self._lock:
            for p in self.tmp_dir.iterdir():
                if p.is_file():
                    _unlink_quietly(p)
                    n += 1
        return n

    def copy_in(self, key: str, source) -> Path:
        """Durably copy a file into the spool (for files taken from a watched folder)."""
        with open(source, "rb") as f:
            data = f.read()
        return self.write(key, data)

    def disk_free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
