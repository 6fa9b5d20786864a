"""Crash-safe file system steps: every change is a rename of something complete, followed by fsync.

After a power cut (or ``kill -9``) at any point, a path either has its old
content or its new content, never a mix: files are written to a temporary name,
fsync'd and renamed over the old one; symlinks are switched the same way; the
directory holding the name is fsync'd so the rename itself is durable.
Temporary and half-deleted names start with ``.`` and are swept by the caller.
"""

import os
import shutil
from pathlib import Path


def fsync_dir(path) -> None:
    """Make renames and new names in directory ``path`` durable."""
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def write_durably(path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (write temp, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = _temporary_name(path, "tmp")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def switch_symlink(link, target: str) -> None:
    """Point symlink ``link`` at ``target`` (relative to the link's folder) in one atomic rename."""
    link = Path(link)
    tmp = _temporary_name(link, "link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_link(link) -> None:
    link = Path(link)
    if link.is_symlink():
        link.unlink()
        fsync_dir(link.parent)


def remove_tree(path) -> None:
    """Delete a directory tree; it is first renamed to a hidden name so a half-deleted tree is never mistaken
    for a complete one."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    if path.name.startswith("."):
        trash = path
    else:
        os.rename(path, trash)
        fsync_dir(path.parent)
    shutil.rmtree(trash)


def fsync_tree(root) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root``'s parent."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(root.parent)
