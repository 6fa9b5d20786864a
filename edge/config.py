"""The runtime's settings: one TOML file (``edge serve --config edge.toml``) -> :class:`EdgeConfig`.

Every section is a frozen dataclass with the defaults a fresh install uses; a
file only needs the keys it changes. Loading validates every key and raises
:class:`~edge.errors.ConfigError` naming the file and the key, e.g.
``edge.toml: scp.port must be an integer in 1..65535, got 'abc'``. Unknown
sections and keys are errors too (a typo must not silently fall back to a
default). Relative paths are taken relative to the config file's folder.

TOML parsing uses :mod:`tomllib` (Python >= 3.11), else the ``tomli`` package.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from edge.errors import ConfigError, MissingDependencyError

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL_NAMES = ("student.onnx", "teacher.onnx")

# DICOM AE titles: up to 16 characters of the default repertoire, no backslash or control characters.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_BACKENDS = ("onnxruntime", "tensorrt")


class _Invalid(Exception):
    """A value failed its check; the message completes "<key> must ..."."""


# Checks: value from TOML -> converted value, or _Invalid("must be ...").


def _bool(value):
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _int(lo: int, hi: Optional[int] = None) -> Callable:
    def check(value):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            raise _Invalid(f"must be an integer in {lo}..{hi}" if hi is not None else f"must be an integer >= {lo}")
        return value

    return check


def _number(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable:
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
            raise _Invalid(f"must be a number {bound}" + (f" and <= {hi:g}" if hi != math.inf else ""))
        return float(value)

    return check


def _text(allow_empty: bool = True) -> Callable:
    def check(value):
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise _Invalid("must be a string" if allow_empty else "must be a non-empty string")
        return value

    return check


def _choice(*options: str) -> Callable:
    def check(value):
        if value not in options:
            raise _Invalid(f"must be one of {', '.join(repr(o) for o in options)}")
        return value

    return check


def _report_threshold(value):
    if value == "model":
        return value
    try:
        return _number(0, 1)(value)
    except _Invalid:
        raise _Invalid("must be \"model\" or a number >= 0 and <= 1") from None


def _ae_title(value):
    if not isinstance(value, str) or not _AE_TITLE.fullmatch(value) or not value.strip():
        raise _Invalid("must be an AE title: 1..16 printable ASCII characters, no backslash")
    return value


def _ae_titles(value):
    if not isinstance(value, list):
        raise _Invalid("must be a list of AE titles")
    for item in value:
        _ae_title(item)
    return tuple(value)


def _path(value):
    """A path; "" means unset. Made absolute later, against the config file's folder."""
    if not isinstance(value, str):
        raise _Invalid("must be a path string")
    return value


def _setting(default, check: Callable, doc: str = ""):
    return field(default=default, metadata={"check": check, "doc": doc})


def _section(cls):
    return field(default_factory=cls)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the Storage SCP (DICOM over TLS). Off unless ``enabled``."""

    enabled: bool = _setting(False, _bool)
    certificate: str = _setting("", _path, "server certificate chain, PEM")
    private_key: str = _setting("", _path, "server private key, PEM")
    ca_certificates: str = _setting("", _path, "CA bundle to verify client certificates; '' to not ask for them")
    require_client_certificate: bool = _setting(False, _bool)


@dataclass(frozen=True)
class ScpConfig:
    """The DICOM Storage SCP the scanner pushes to."""

    enabled: bool = _setting(True, _bool)
    ae_title: str = _setting("CT_EDGE", _ae_title)
    host: str = _setting("0.0.0.0", _text(allow_empty=False))
    port: int = _setting(11112, _int(1, 65535))
    allowed_calling_ae_titles: Tuple[str, ...] = _setting((), _ae_titles, "empty: accept any calling AE title")
    maximum_associations: int = _setting(4, _int(1, 64))
    network_timeout_s: float = _setting(60.0, _number(0, lo_open=True))
    acse_timeout_s: float = _setting(30.0, _number(0, lo_open=True))
    dimse_timeout_s: float = _setting(30.0, _number(0, lo_open=True))
    tls: TlsConfig = _section(TlsConfig)


@dataclass(frozen=True)
class WatchConfig:
    """A folder the scanner writes files into; files are taken once their size is stable."""

    enabled: bool = _setting(False, _bool)
    folder: str = _setting("", _path)
    poll_interval_s: float = _setting(1.0, _number(0, lo_open=True))
    stable_s: float = _setting(2.0, _number(0))


@dataclass(frozen=True)
class StorageConfig:
    """Where the spool, the quarantine of rejected instances and the ledger live."""

    state_dir: str = _setting("state", _path)
    keep_rejected: bool = _setting(True, _bool, "keep a copy of each rejected instance in state_dir/rejected")


@dataclass(frozen=True)
class ModelConfig:
    """The detector: an ONNX file with its embedded specs, or the version installed by ``edge update apply``."""

    path: str = _setting("", _path, "'' = the committed default model")
    update_state_dir: str = _setting("", _path, "'' = off; else the model is <dir>/current, picked up between series")
    backend: str = _setting("onnxruntime", _choice(*_BACKENDS))
    intra_op_threads: int = _setting(0, _int(0, 256), "0 = ONNX Runtime's default")
    batch_size: int = _setting(4, _int(1, 256))


@dataclass(frozen=True)
class PipelineConfig:
    """Bounded queues between the stages, worker counts and series timing."""

    max_in_flight: int = _setting(64, _int(1, 100000), "instances admitted but not yet preprocessed")
    decode_workers: int = _setting(1, _int(1, 64))
    preprocess_workers: int = _setting(1, _int(1, 64))
    infer_queue: int = _setting(32, _int(1, 100000))
    output_queue: int = _setting(4, _int(1, 1000))
    series_idle_s: float = _setting(10.0, _number(0, lo_open=True))
    reorder_timeout_s: float = _setting(2.0, _number(0))
    max_pending_per_series: int = _setting(64, _int(1, 100000))
    max_open_series: int = _setting(8, _int(1, 1000))
    min_slices: int = _setting(3, _int(1, 100000), "series with fewer usable slices are rejected")
    drain_timeout_s: float = _setting(120.0, _number(0))


@dataclass(frozen=True)
class PacsConfig:
    """Optional C-STORE of each structured report to a PACS node."""

    enabled: bool = _setting(False, _bool)
    host: str = _setting("", _text())
    port: int = _setting(104, _int(1, 65535))
    ae_title: str = _setting("PACS", _ae_title)
    calling_ae_title: str = _setting("CT_EDGE", _ae_title)
    timeout_s: float = _setting(30.0, _number(0, lo_open=True))


@dataclass(frozen=True)
class OutputsConfig:
    """Findings out: JSON Lines, overlay PNGs, DICOM SR."""

    dir: str = _setting("results", _path)
    jsonl: bool = _setting(True, _bool)
    overlays: bool = _setting(True, _bool)
    sr: bool = _setting(True, _bool)
    # Findings below this probability are kept in findings.jsonl (for FROC analysis)
    # but get no overlay and no SR entry: the SR is what a radiologist sees.
    # "model": the threshold validated with the model that processed the series
    # (its decode spec's report_threshold; 0.5 for models without one).
    report_threshold: Union[str, float] = _setting("model", _report_threshold)
    pacs: PacsConfig = _section(PacsConfig)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus ``/metrics`` and ``/healthz`` over HTTP."""

    enabled: bool = _setting(True, _bool)
    host: str = _setting("127.0.0.1", _text(allow_empty=False))
    port: int = _setting(9108, _int(1, 65535))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _setting("INFO", _choice(*_LOG_LEVELS))


@dataclass(frozen=True)
class EdgeConfig:
    """The whole runtime configuration."""

    scp: ScpConfig = _section(ScpConfig)
    watch: WatchConfig = _section(WatchConfig)
    storage: StorageConfig = _section(StorageConfig)
    model: ModelConfig = _section(ModelConfig)
    pipeline: PipelineConfig = _section(PipelineConfig)
    outputs: OutputsConfig = _section(OutputsConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    source: str = field(default="<defaults>", compare=False)  # the file it came from, for messages

    def model_path(self) -> Path:
        """The model file: ``model.path``, else the committed default; ConfigError when neither exists."""
        if self.model.path:
            path = Path(self.model.path)
            if not path.is_file():
                raise ConfigError(f"{self.source}: model.path {self.model.path} is not a file")
            return path
        for name in DEFAULT_MODEL_NAMES:
            candidate = MODELS_DIR / name
            if candidate.is_file():
                return candidate
        raise ConfigError(f"{self.source}: model.path is not set and no model is committed in {MODELS_DIR}")

    @property
    def spool_dir(self) -> Path:
        return Path(self.storage.state_dir) / "spool"

    @property
    def rejected_dir(self) -> Path:
        return Path(self.storage.state_dir) / "rejected"

    @property
    def ledger_path(self) -> Path:
        return Path(self.storage.state_dir) / "ledger.sqlite"


def _is_section(f: dataclasses.Field) -> bool:
    return isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)


def _build(cls, data: Dict[str, Any], prefix: str, source: str, base: Optional[Path]):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')} must be a table")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - set(known))
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {keys}")
    values = {}
    for name, f in known.items():
        if _is_section(f):
            values[name] = _build(f.default_factory, data.get(name, {}), f"{prefix}{name}.", source, base)
            continue
        if name not in data:
            continue
        try:
            value = f.metadata["check"](data[name])
        except _Invalid as e:
            raise ConfigError(f"{source}: {prefix}{name} {e}, got {data[name]!r}") from None
        if f.metadata["check"] is _path and value and base is not None:
            value = os.path.normpath(str(base / os.path.expanduser(value)))
        values[name] = value
    return cls(**values)


def _check_consistency(config: EdgeConfig) -> None:
    """Rules across keys."""
    source = config.source
    tls = config.scp.tls
    if tls.enabled:
        for key in ("certificate", "private_key"):
            value = getattr(tls, key)
            if not value:
                raise ConfigError(f"{source}: scp.tls.{key} is required when scp.tls.enabled is true")
            if not Path(value).is_file():
                raise ConfigError(f"{source}: scp.tls.{key} {value} is not a file")
        if tls.require_client_certificate and not tls.ca_certificates:
            raise ConfigError(f"{source}: scp.tls.ca_certificates is required when scp.tls.require_client_certificate is true")
    if config.model.update_state_dir and config.model.path:
        raise ConfigError(f"{source}: model.path must be empty when model.update_state_dir is set "
                          "(the model in service is the installed version)")
    if config.watch.enabled and not config.watch.folder:
        raise ConfigError(f"{source}: watch.folder is required when watch.enabled is true")
    if config.outputs.pacs.enabled and not config.outputs.pacs.host:
        raise ConfigError(f"{source}: outputs.pacs.host is required when outputs.pacs.enabled is true")
    if config.outputs.pacs.enabled and not config.outputs.sr:
        raise ConfigError(f"{source}: outputs.pacs.enabled needs outputs.sr = true (the SR is what is sent)")
    if config.metrics.enabled and config.scp.enabled and config.metrics.port == config.scp.port:
        raise ConfigError(f"{source}: metrics.port {config.metrics.port} is also scp.port")


def config_from_dict(data: Dict[str, Any], source: str = "<config>", base_dir=None) -> EdgeConfig:
    """Validate a parsed TOML document; relative paths are resolved against ``base_dir`` when given."""
    base = Path(base_dir) if base_dir is not None else None
    config = _build(EdgeConfig, data, "", source, base)
    config = dataclasses.replace(config, source=source)
    if base is not None:
        storage = config.storage
        outputs = config.outputs
        # defaults are relative too: resolve them like values from the file
        if not os.path.isabs(storage.state_dir):
            config = dataclasses.replace(config, storage=dataclasses.replace(storage, state_dir=os.path.normpath(str(base / storage.state_dir))))
        if not os.path.isabs(outputs.dir):
            config = dataclasses.replace(config, outputs=dataclasses.replace(outputs, dir=os.path.normpath(str(base / outputs.dir))))
    _check_consistency(config)
    return config


def _toml_module():
    try:
        import tomllib

        return tomllib
    except ModuleNotFoundError:
        pass
    try:
        import tomli

        return tomli
    except ModuleNotFoundError:
        raise MissingDependencyError("reading the config needs Python >= 3.11 (tomllib) or the 'tomli' package") from None


def load_config(path) -> EdgeConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    label = str(path)
    toml = _toml_module()
    try:
        with open(path, "rb") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read the config file: {e.strerror or e}") from None
    except toml.TOMLDecodeError as e:
        raise ConfigError(f"{label}: not valid TOML: {e}") from None
    return config_from_dict(data, source=label, base_dir=path.resolve().parent)


def describe_settings(cls=EdgeConfig, prefix: str = "") -> Dict[str, Tuple[Any, str]]:
    """Every key as ``section.key`` -> (default, doc): for docs and the example config's test."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        if _is_section(f):
            out.update(describe_settings(f.default_factory, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (f.default, f.metadata.get("doc", ""))
    return out
