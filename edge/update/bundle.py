"""The bundle archive: a tar (plain or gzip) of ``manifest.json``, ``manifest.sig`` and ``payload/...``.

Layout, in this order: ``manifest.json`` (canonical JSON, :mod:`edge.update.manifest`),
``manifest.sig`` (the 64-byte Ed25519 signature of exactly those bytes), then
every payload file the manifest lists, once, as a regular file.

Reading is two streaming passes with bounded memory (1 MiB chunks):

1. :func:`verify_bundle` checks the size caps, the manifest, the signature, the
   expiry and every member (type, name, size, sha256) and writes nothing;
2. :func:`extract_bundle` reads the archive again and writes the files into a
   new folder, checking everything once more (the file may have changed since
   pass 1); on any error the caller deletes that folder.

Refused, whatever the signature says: members that are not regular files
(symlinks, hard links, devices, FIFOs, folders, sparse files), absolute names,
``..``, names the manifest does not list, duplicates, missing files, size
mismatches, archives over the caps (on disk and after decompression).
"""

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Optional

from edge.update.durable import fsync_tree
from edge.update.errors import BundleError, ExpiredError, UpdateError
from edge.update.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    format_timestamp,
    parse_manifest,
)
from edge.update.signing import SIGNATURE_BYTES, PrivateKey, TrustStore

CHUNK = 1 << 20
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclass(frozen=True)
class BundleLimits:
    """Caps checked before anything is read into memory or written."""

    max_bundle_bytes: int = 4 << 30  # on disk, and the tar stream after decompression
    max_file_bytes: int = 2 << 30
    max_files: int = 256


DEFAULT_LIMITS = BundleLimits()


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed :func:`verify_bundle` (pass 1)."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes


def hash_file(path) -> FileEntry:
    """sha256 and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(h.hexdigest(), size)


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(out, manifest: Manifest, sources: Dict[str, Path], key: PrivateKey, compress: bool = True) -> Path:
    """Sign ``manifest`` with ``key`` and write the bundle (reproducible bytes: fixed owners, times and order).

    ``sources`` maps every payload path of the manifest to the file to store; each must match its manifest entry.
    """
    out = Path(out)
    if manifest.key_id != key.key_id:
        raise UpdateError(f"manifest names key {manifest.key_id} but the signing key is {key.key_id}")
    if set(sources) != set(manifest.files):
        raise UpdateError(f"payload files {sorted(sources)} differ from the manifest's {sorted(manifest.files)}")
    data = manifest.to_bytes()
    signature = key.sign(data)
    mtime = int(manifest.created_at.timestamp())
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            stream = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if compress else raw
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tarinfo(MANIFEST_NAME, len(data), mtime), io.BytesIO(data))
                tar.addfile(_tarinfo(SIGNATURE_NAME, len(signature), mtime), io.BytesIO(signature))
                for name in sorted(sources):
                    entry = manifest.files[name]
                    if hash_file(sources[name]) != entry:
                        raise UpdateError(f"{sources[name]} changed while the bundle was written")
                    with open(sources[name], "rb") as f:
                        tar.addfile(_tarinfo(name, entry.size, mtime), f)
            if compress:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise BundleError(out, f"cannot write the bundle: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


class _LimitedReader(io.RawIOBase):
    """Passes reads through and fails once more than ``limit`` bytes came out (a decompression bomb)."""

    def __init__(self, f, limit: int, source):
        self.f = f
        self.limit = limit
        self.source = source
        self.count = 0

    def readable(self):
        return True

    def read(self, n=-1):
        if n is None or n < 0 or n > self.limit - self.count + 1:
            n = self.limit - self.count + 1
        data = self.f.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise BundleError(self.source, f"unpacks to more than the {self.limit}-byte limit")
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _member_problem(member: tarfile.TarInfo) -> Optional[str]:
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "is a device file"
    if member.isfifo():
        return "is a FIFO"
    if member.isdir():
        return "is a folder entry"
    if member.issparse() or not member.isreg():
        return "is not a regular file"
    name = member.name
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' path that escapes the bundle"
    return None


class _Scan:
    """One streaming pass over a bundle; ``out_dir`` set: write the payload there."""

    def __init__(self, path: Path, trust: TrustStore, limits: BundleLimits, now: datetime,
                 out_dir: Optional[Path] = None, expect: Optional[VerifiedBundle] = None):
        self.path = path
        self.trust = trust
        self.limits = limits
        self.now = now
        self.out_dir = out_dir
        self.expect = expect

    def error(self, reason: str) -> BundleError:
        return BundleError(self.path, reason)

    def _read(self, fn: Callable):
        try:
            return fn()
        except _READ_ERRORS as e:
            raise self.error(f"cannot read the archive (truncated, or not a tar / tar.gz): {e}") from None

    def run(self) -> VerifiedBundle:
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise self.error(f"cannot open the bundle: {e.strerror or e}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > self.limits.max_bundle_bytes:
                raise self.error(f"is {size} bytes, over the {self.limits.max_bundle_bytes}-byte limit")
            magic = self._read(lambda: f.read(2))
            f.seek(0)
            raw = gzip.GzipFile(fileobj=f, mode="rb") if magic == b"\x1f\x8b" else f
            limited = _LimitedReader(raw, self.limits.max_bundle_bytes, self.path)
            stream = io.BufferedReader(limited, CHUNK)
            tar = self._read(lambda: tarfile.open(fileobj=stream, mode="r|"))
            with tar:
                verified = self._members(tar)
                end = tar.offset
            # Read to the end: gzip checks its CRC there, and the tar must close with its end-of-archive blocks.
            while self._read(lambda: stream.read(CHUNK)):
                pass
            if limited.count < end + 2 * tarfile.BLOCKSIZE:
                raise self.error("is truncated: the archive's end-of-archive marker is missing")
            return verified

    def _next(self, members):
        return self._read(lambda: next(members, None))

    def _small(self, tar, member, name: str, max_size: int) -> bytes:
        if member is None or member.name != name:
            found = "the end of the archive" if member is None else repr(member.name)
            raise self.error(f"must start with {MANIFEST_NAME} then {SIGNATURE_NAME}; found {found}")
        problem = _member_problem(member)
        if problem:
            raise self.error(f"{name} {problem}")
        if member.size > max_size:
            raise self.error(f"{name} is {member.size} bytes, at most {max_size} allowed")
        data = self._read(lambda: tar.extractfile(member).read())
        if len(data) != member.size:
            raise self.error(f"{name} is truncated")
        return data

    def _members(self, tar) -> VerifiedBundle:
        members = iter(tar)
        manifest_bytes = self._small(tar, self._next(members), MANIFEST_NAME, MAX_MANIFEST_BYTES)
        signature = self._small(tar, self._next(members), SIGNATURE_NAME, SIGNATURE_BYTES)
        manifest = parse_manifest(manifest_bytes, f"{self.path}:{MANIFEST_NAME}")
        self.trust.verify(manifest_bytes, signature, manifest.key_id, self.path)
        if self.now >= manifest.expires_at:
            raise ExpiredError(self.path, f"the manifest expired at {manifest.expires} (now {format_timestamp(self.now)})")
        expected = self.expect
        if expected is not None and (manifest_bytes, signature) != (expected.manifest_bytes, expected.signature):
            raise self.error("changed since it was verified")
        self._check_caps(manifest)
        if self.out_dir is not None:
            for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature)):
                self._write_file(name, io.BytesIO(data), FileEntry(hashlib.sha256(data).hexdigest(), len(data)))
        seen = set()
        while True:
            member = self._next(members)
            if member is None:
                break
            problem = _member_problem(member)
            if problem:
                raise self.error(f"member {member.name!r} {problem}")
            entry = manifest.files.get(member.name)
            if entry is None:
                raise self.error(f"member {member.name!r} is not listed in the manifest")
            if member.name in seen:
                raise self.error(f"member {member.name!r} appears more than once")
            seen.add(member.name)
            if member.size != entry.size:
                raise self.error(f"member {member.name!r} is {member.size} bytes, the manifest says {entry.size}")
            src = self._read(lambda: tar.extractfile(member))
            if self.out_dir is None:
                self._hash(member.name, src, entry)
            else:
                self._write_file(member.name, src, entry)
        missing = sorted(set(manifest.files) - seen)
        if missing:
            raise self.error(f"lacks {len(missing)} file(s) the manifest lists, e.g. {missing[0]!r} (truncated?)")
        return VerifiedBundle(self.path, manifest, manifest_bytes, signature)

    def _check_caps(self, manifest: Manifest) -> None:
        lim = self.limits
        if len(manifest.files) > lim.max_files:
            raise self.error(f"holds {len(manifest.files)} files, at most {lim.max_files} allowed")
        for name, e in manifest.files.items():
            if e.size > lim.max_file_bytes:
                raise self.error(f"{name} is {e.size} bytes, over the {lim.max_file_bytes}-byte per-file limit")
        if manifest.total_size > lim.max_bundle_bytes:
            raise self.error(f"payload is {manifest.total_size} bytes, over the {lim.max_bundle_bytes}-byte limit")

    def _chunks(self, name: str, src, size: int):
        left = size
        while left:
            chunk = self._read(lambda: src.read(min(CHUNK, left)))
            if not chunk:
                raise self.error(f"member {name!r} is truncated ({size - left} of {size} bytes)")
            left -= len(chunk)
            yield chunk

    def _hash(self, name: str, src, entry: FileEntry) -> None:
        h = hashlib.sha256()
        for chunk in self._chunks(name, src, entry.size):
            h.update(chunk)
        if h.hexdigest() != entry.sha256:
            raise self.error(f"member {name!r} does not match its sha256 in the manifest (tampered or corrupt)")

    def _write_file(self, name: str, src, entry: FileEntry) -> None:
        target = self.out_dir.joinpath(*name.split("/"))
        h = hashlib.sha256()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                for chunk in self._chunks(name, src, entry.size):
                    h.update(chunk)
                    f.write(chunk)
        except OSError as e:
            raise UpdateError(f"cannot write {target}: {e.strerror or e}") from None
        if h.hexdigest() != entry.sha256:
            raise self.error(f"member {name!r} does not match its sha256 in the manifest (changed since verified)")


def _now(now: Optional[datetime]) -> datetime:
    return now if now is not None else datetime.now(timezone.utc)


def verify_bundle(path, trust: TrustStore, limits: BundleLimits = DEFAULT_LIMITS,
                  now: Optional[datetime] = None) -> VerifiedBundle:
    """Pass 1: check everything, write nothing. Raises BundleError (and its kinds) or ManifestError."""
    return _Scan(Path(path), trust, limits, _now(now)).run()


def extract_bundle(bundle: VerifiedBundle, trust: TrustStore, dest, limits: BundleLimits = DEFAULT_LIMITS,
                   now: Optional[datetime] = None) -> Path:
    """Pass 2: write a verified bundle's files into the new folder ``dest`` (manifest and signature included).

    Everything is checked again while writing; on error ``dest`` is left for the caller to delete.
    Files and folders are fsync'd before returning.
    """
    dest = Path(dest)
    try:
        dest.mkdir(mode=0o755)
    except OSError as e:
        raise UpdateError(f"cannot create {dest}: {e.strerror or e}") from None
    _Scan(bundle.path, trust, limits, _now(now), out_dir=dest, expect=bundle).run()
    fsync_tree(dest)
    return dest

