"""The bundle manifest: what a bundle holds and where it may be installed.

The manifest is stored as canonical JSON (sorted keys, no whitespace, ASCII)
and the Ed25519 signature (``manifest.sig``) covers exactly those bytes. It
lists the sha256 and size of every payload file, so one signature pins the
whole bundle: files cannot be swapped between bundles.

The parser is strict: unknown, missing or mistyped fields, duplicate keys,
non-finite numbers and non-canonical encodings are all a :class:`ManifestError`
naming the field. Nothing else escapes it, whatever the bytes.
"""

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Optional, Tuple

from edge.update.errors import ManifestError

FORMAT = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_DIR = "payload"
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILES = 1024
MAX_RELEASE = 2**53 - 1  # exact in every JSON implementation
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_TAG = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}\Z")
_KEY_ID = re.compile(r"[0-9a-f]{16}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_DOTTED = re.compile(r"(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,3}\Z")
_SEMVER = re.compile(
    r"(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?\Z"
)
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_MAX_PATH_DEPTH = 8


def canonical_json(obj) -> bytes:
    """The one byte form of a JSON value that is signed: sorted keys, no whitespace, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _version_tuple(text: str) -> Tuple[int, ...]:
    m = re.match(r"\d+(\.\d+)*", text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in m.group(0).split("."))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 comparing the leading dotted numbers of two versions, missing parts counting as 0.

    ``8.6 == 8.6.0``; suffixes are ignored (``10.3.0.30+cuda12`` is 10.3.0.30, ``1.2.0-rc.1`` is 1.2.0).
    ValueError when either does not start with a number.
    """
    ta, tb = _version_tuple(a), _version_tuple(b)
    n = max(len(ta), len(tb))
    ta += (0,) * (n - len(ta))
    tb += (0,) * (n - len(tb))
    return (ta > tb) - (ta < tb)


def is_hardware_tag(text) -> bool:
    return isinstance(text, str) and bool(_TAG.match(text))


def is_payload_path(path) -> bool:
    """A relative path under ``payload/`` made of plain names (no ``..``, no absolute, no backslash)."""
    if not isinstance(path, str):
        return False
    parts = path.split("/")
    return (
        len(parts) >= 2
        and len(parts) <= _MAX_PATH_DEPTH
        and parts[0] == PAYLOAD_DIR
        and all(_PATH_PART.match(p) for p in parts[1:])
    )


def parse_timestamp(text: str) -> datetime:
    """``2025-01-31T12:00:00Z`` -> aware UTC datetime; ValueError otherwise."""
    if not isinstance(text, str) or not _TIMESTAMP.match(text):
        raise ValueError(f"not a UTC timestamp like 2025-01-31T12:00:00Z: {text!r}")
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


def format_timestamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorRTRange:
    """TensorRT versions the bundle may be built with: ``minimum <= v < below`` (``below`` None: no upper bound)."""

    minimum: str
    below: Optional[str] = None

    def contains(self, version: str) -> bool:
        if compare_versions(version, self.minimum) < 0:
            return False
        return self.below is None or compare_versions(version, self.below) < 0

    def format(self) -> str:
        return f">={self.minimum}" + (f",<{self.below}" if self.below else "")


@dataclass(frozen=True)
class Targets:
    """Hardware tags (``"cpu"`` = any ONNX Runtime device; e.g. ``"jetson-orin"``, ``"sm_87"``) and TensorRT range."""

    hardware: Tuple[str, ...]
    tensorrt: Optional[TensorRTRange] = None


@dataclass(frozen=True)
class GoldenSpec:
    """Where the golden vectors are and how close the device must come to them.

    ``heatmap_atol``: max abs difference of the heatmap output. Peaks (decoded
    with the model's decode spec) must match within ``score_atol`` in score,
    ``position_px`` in model-input pixels and ``diameter_rel`` relative diameter.
    """

    file: str
    heatmap_atol: float = 0.05
    score_atol: float = 0.05
    position_px: float = 1.5
    diameter_rel: float = 0.2


@dataclass(frozen=True)
class Manifest:
    model: str
    version: str  # semantic version, for people
    release: int  # monotonically increasing counter, for anti-rollback
    created: str
    expires: str
    min_runtime_version: str
    targets: Targets
    key_id: str  # the signing key (signing.key_id)
    model_file: str
    golden: GoldenSpec
    files: Dict[str, FileEntry] = field(default_factory=dict)
    calibration_cache: Optional[str] = None
    recipe: Optional[str] = None
    format: int = FORMAT

    @property
    def created_at(self) -> datetime:
        return parse_timestamp(self.created)

    @property
    def expires_at(self) -> datetime:
        return parse_timestamp(self.expires)

    @property
    def version_name(self) -> str:
        """The installed directory name: ``<release>-<version>``."""
        return f"{self.release}-{self.version}"

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_dict(self) -> dict:
        trt = self.targets.tensorrt
        return {
            "format": self.format,
            "model": self.model,
            "version": self.version,
            "release": self.release,
            "created": self.created,
            "expires": self.expires,
            "min_runtime_version": self.min_runtime_version,
            "targets": {
                "hardware": list(self.targets.hardware),
                "tensorrt": None if trt is None else {"min": trt.minimum, "below": trt.below},
            },
            "key_id": self.key_id,
            "model_file": self.model_file,
            "calibration_cache": self.calibration_cache,
            "recipe": self.recipe,
            "golden": {
                "file": self.golden.file,
                "heatmap_atol": self.golden.heatmap_atol,
                "score_atol": self.golden.score_atol,
                "position_px": self.golden.position_px,
                "diameter_rel": self.golden.diameter_rel,
            },
            "files": {p: {"sha256": e.sha256, "size": e.size} for p, e in self.files.items()},
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed and stored as ``manifest.json``."""
        data = canonical_json(self.to_dict())
        parse_manifest(data, "<new manifest>")  # the writer never produces what the reader refuses
        return data


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


class _Constant(ValueError):
    pass


def _object_without_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


def _reject_constant(name):
    raise _Constant(name)


class _Reader:
    """Takes typed fields out of one JSON object; errors name the dotted field path."""

    def __init__(self, obj, prefix: str, source: str):
        self.source = source
        self.prefix = prefix
        if not isinstance(obj, dict):
            raise ManifestError(source, prefix, f"must be a JSON object, got {_json_type(obj)}")
        self.obj = obj
        self.seen = set()

    def path(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ManifestError:
        return ManifestError(self.source, self.path(name), reason)

    def raw(self, name: str):
        if name not in self.obj:
            raise self.error(name, "is missing")
        self.seen.add(name)
        return self.obj[name]

    def string(self, name: str, pattern, what: str, nullable=False) -> Optional[str]:
        v = self.raw(name)
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not pattern.match(v):
            raise self.error(name, f"must be {what}{' or null' if nullable else ''}, got {_show(v)}")
        return v

    def integer(self, name: str, lo: int, hi: int) -> int:
        v = self.raw(name)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.error(name, f"must be an integer in {lo}..{hi}, got {_show(v)}")
        return v

    def number(self, name: str, lo: float, hi: float) -> float:
        v = self.raw(name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.error(name, f"must be a number in [{lo:g}, {hi:g}], got {_show(v)}")
        return float(v)

    def timestamp(self, name: str) -> str:
        v = self.raw(name)
        try:
            parse_timestamp(v)
        except (ValueError, TypeError, OverflowError):
            raise self.error(name, f"must be a UTC timestamp like 2025-01-31T12:00:00Z, got {_show(v)}") from None
        return v

    def payload_path(self, name: str, files: Dict[str, FileEntry], nullable=False) -> Optional[str]:
        v = self.raw(name)
        if v is None and nullable:
            return None
        if not is_payload_path(v):
            raise self.error(name, f"must be a payload/... path{' or null' if nullable else ''}, got {_show(v)}")
        if v not in files:
            raise self.error(name, f"names {v!r}, which is not listed in 'files'")
        return v

    def done(self) -> None:
        unknown = sorted(set(self.obj) - self.seen)
        if unknown:
            raise ManifestError(self.source, self.path(unknown[0]), "is not a known field")


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(
        type(v), type(v).__name__
    )


def _show(v) -> str:
    if isinstance(v, (dict, list)):
        return _json_type(v)
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _files(r: _Reader) -> Dict[str, FileEntry]:
    raw = r.raw("files")
    if not isinstance(raw, dict) or not raw:
        raise r.error("files", f"must be a non-empty object of payload path -> {{sha256, size}}, got {_show(raw)}")
    if len(raw) > MAX_FILES:
        raise r.error("files", f"lists {len(raw)} files, at most {MAX_FILES} allowed")
    files = {}
    for path in sorted(raw):
        if not is_payload_path(path):
            raise r.error("files", f"{_show(path)} is not a payload/... path of plain names")
        fr = _Reader(raw[path], f"files[{path}]", r.source)
        files[path] = FileEntry(
            sha256=fr.string("sha256", _SHA256, "64 lowercase hex digits"),
            size=fr.integer("size", 0, 2**62),
        )
        fr.done()
    for path in files:  # "payload/a" and "payload/a/b" cannot both be files
        parent = path.rsplit("/", 1)[0]
        while parent != PAYLOAD_DIR:
            if parent in files:
                raise r.error("files", f"{parent!r} is listed as a file and as a folder")
            parent = parent.rsplit("/", 1)[0]
    return files


def _targets(r: _Reader) -> Targets:
    tr = _Reader(r.raw("targets"), r.path("targets"), r.source)
    hw = tr.raw("hardware")
    if (
        not isinstance(hw, list)
        or not hw
        or len(hw) > 64
        or not all(isinstance(t, str) and _TAG.match(t) for t in hw)
        or len(set(hw)) != len(hw)
    ):
        raise tr.error("hardware", f"must be a non-empty list of distinct tags like 'cpu' or 'jetson-orin', got {_show(hw)}")
    trt_raw = tr.raw("tensorrt")
    trt = None
    if trt_raw is not None:
        rr = _Reader(trt_raw, tr.path("tensorrt"), r.source)
        minimum = rr.string("min", _DOTTED, "a dotted version like '8.6'")
        below = rr.string("below", _DOTTED, "a dotted version like '11'", nullable=True)
        rr.done()
        if below is not None and compare_versions(below, minimum) <= 0:
            raise rr.error("below", f"{below!r} must be above min {minimum!r}")
        trt = TensorRTRange(minimum, below)
    tr.done()
    return Targets(tuple(hw), trt)


def _golden(r: _Reader, files: Dict[str, FileEntry]) -> GoldenSpec:
    gr = _Reader(r.raw("golden"), r.path("golden"), r.source)
    spec = GoldenSpec(
        file=gr.payload_path("file", files),
        heatmap_atol=gr.number("heatmap_atol", 0.0, 1.0),
        score_atol=gr.number("score_atol", 0.0, 1.0),
        position_px=gr.number("position_px", 0.0, 1e4),
        diameter_rel=gr.number("diameter_rel", 0.0, 1e3),
    )
    gr.done()
    return spec


def manifest_from_dict(obj, source: str = MANIFEST_NAME) -> Manifest:
    """Build and validate a :class:`Manifest` from parsed JSON; ManifestError naming the first bad field."""
    r = _Reader(obj, "", source)
    fmt = r.raw("format")
    if fmt != FORMAT or isinstance(fmt, bool) or not isinstance(fmt, int):
        raise r.error("format", f"this runtime reads format {FORMAT}, got {_show(fmt)}")
    files = _files(r)
    m = Manifest(
        format=fmt,
        model=r.string("model", _NAME, "a model name of letters, digits, '.', '_', '-' (max 64)"),
        version=r.string("version", _SEMVER, "a semantic version like '1.2.0'"),
        release=r.integer("release", 1, MAX_RELEASE),
        created=r.timestamp("created"),
        expires=r.timestamp("expires"),
        min_runtime_version=r.string("min_runtime_version", _DOTTED, "a dotted version like '0.1.0'"),
        targets=_targets(r),
        key_id=r.string("key_id", _KEY_ID, "16 lowercase hex digits"),
        model_file=r.payload_path("model_file", files),
        calibration_cache=r.payload_path("calibration_cache", files, nullable=True),
        recipe=r.payload_path("recipe", files, nullable=True),
        golden=_golden(r, files),
        files=files,
    )
    r.done()
    if m.expires_at <= m.created_at:
        raise r.error("expires", f"{m.expires} is not after created {m.created}")
    return m


def parse_manifest(data, source: str = MANIFEST_NAME) -> Manifest:
    """Parse the exact bytes of ``manifest.json``; ManifestError for anything that is not a valid manifest."""
    if not isinstance(data, (bytes, bytearray)):
        raise ManifestError(source, "", f"must be bytes, got {type(data).__name__}")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, "", f"is {len(data)} bytes, at most {MAX_MANIFEST_BYTES} allowed")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(source, "", f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise ManifestError(source, str(e.key), "appears more than once") from None
    except _Constant as e:
        raise ManifestError(source, "", f"holds the non-JSON number {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise ManifestError(source, "", f"is not valid JSON: {str(e)[:200]}") from None
    manifest = manifest_from_dict(obj, source)
    try:
        canonical = canonical_json(obj)
    except ValueError as e:  # cannot happen for a validated manifest; kept typed all the same
        raise ManifestError(source, "", f"cannot be serialised canonically: {e}") from None
    if canonical != bytes(data):
        raise ManifestError(source, "", "is not in canonical form (sorted keys, no whitespace, ASCII), as signed")
    return manifest
