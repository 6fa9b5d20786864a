"""False-positive reduction: a finding's probability from its whole track (NumPy only: it runs on the device).

On three adjacent slices a vessel seen end-on looks like a solid nodule, and the
network's per-slice score cannot tell them apart. The track the finding was
linked from can: a nodule is about as deep as it is wide, narrows toward its
ends and stays put in the slice plane; a vessel runs on with a constant width
or drifts sideways. :class:`FindingRescorer` is a logistic model over these
measurements and the track's scores. It is fitted on validation series
(``tools/tune_decode.py --rescorer``, :mod:`toolchain.evaluation.rescorer_fit`),
travels in the decode spec inside the model file, and, when present, replaces
the hand-set shape prior (``max_elongation``, ``min_z_span``).
"""

import math
from dataclasses import asdict, dataclass
from typing import Sequence, Tuple

import numpy as np

from edge.errors import ConfigError

FEATURE_NAMES = (
    "logit_max_score",
    "logit_mean_score",
    "log_depth_ratio",  # log(z span / diameter); z span = extent + one slice spacing
    "log_depth_ratio_sq",  # too flat and too long are both unlike a nodule
    "log_diameter_mm",
    "end_diameter_ratio",
    "end_score_ratio",
    "drift_per_z_span",
    "slice_fill",  # share of the z span with a detection (gaps lower it)
)

_SCORE_EPS = 1e-4


def _logit(p: float) -> float:
    p = min(max(float(p), _SCORE_EPS), 1.0 - _SCORE_EPS)
    return math.log(p / (1.0 - p))


def finding_features(finding) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one :class:`~edge.decode.findings.Finding`.

    A finding seen on a single slice of a single-slice series has no measurable
    depth: it is taken as deep as it is wide (neutral), not as flat.
    """
    diameter = max(finding.diameter_mm, 0.1)
    z_span = finding.z_extent_mm + finding.slice_spacing_mm
    if z_span <= 0:
        z_span = diameter
    depth = math.log(z_span / diameter)
    fill = min(finding.n_slices * finding.slice_spacing_mm / z_span, 1.0) if finding.slice_spacing_mm > 0 else 1.0
    return np.array([
        _logit(finding.max_score),
        _logit(finding.mean_score),
        depth,
        depth * depth,
        math.log(diameter),
        finding.end_diameter_ratio,
        finding.end_score_ratio,
        finding.drift_mm / z_span,
        fill,
    ], float)


def features_matrix(findings: Sequence) -> np.ndarray:
    """(n, len(FEATURE_NAMES)) features of ``findings``."""
    rows = [finding_features(f) for f in findings]
    return np.array(rows, float).reshape(len(rows), len(FEATURE_NAMES))


def _finite_tuple(values, name: str) -> Tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"decode.rescorer.{name} must be a list of numbers") from None
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"decode.rescorer.{name} must hold finite numbers")
    return out


@dataclass(frozen=True)
class FindingRescorer:
    """``probability = sigmoid(bias + sum(weights * (features - mean) / scale))``.

    ``features`` names the model's inputs (a subset of :data:`FEATURE_NAMES`, in
    the order of ``mean``, ``scale`` and ``weights``), so a spec stays readable and
    a runtime refuses one it cannot compute.
    """

    features: Tuple[str, ...]
    mean: Tuple[float, ...]
    scale: Tuple[float, ...]
    weights: Tuple[float, ...]
    bias: float

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.features:
            raise ConfigError("decode.rescorer.features: at least one feature is required")
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown:
            raise ConfigError(f"decode.rescorer.features: unknown feature(s) {', '.join(map(str, unknown))} "
                              f"(this runtime computes {', '.join(FEATURE_NAMES)})")
        if len(set(self.features)) != len(self.features):
            raise ConfigError("decode.rescorer.features: a feature is listed twice")
        n = len(self.features)
        for name in ("mean", "scale", "weights"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"decode.rescorer.{name} must have one value per feature ({n}), "
                                  f"got {len(getattr(self, name))}")
        if not all(s > 0 for s in self.scale):
            raise ConfigError("decode.rescorer.scale values must be > 0")
        if not math.isfinite(self.bias):
            raise ConfigError("decode.rescorer.bias must be a finite number")

    @property
    def _columns(self) -> np.ndarray:
        return np.array([FEATURE_NAMES.index(f) for f in self.features])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits of rows of :data:`FEATURE_NAMES` features (see :func:`features_matrix`)."""
        x = np.asarray(features, float)[..., self._columns]
        z = (x - np.array(self.mean)) / np.array(self.scale)
        return z @ np.array(self.weights) + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(features), -60.0, 60.0)))

    def probability(self, finding) -> float:
        """The rescored probability of one finding."""
        return float(self.probabilities(finding_features(finding)))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d) -> "FindingRescorer":
        if not isinstance(d, dict):
            raise ConfigError(f"decode.rescorer must be a JSON object or null, got {type(d).__name__}")
        missing = sorted(set(cls.__dataclass_fields__) - set(d))
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if missing or unknown:
            raise ConfigError(f"decode.rescorer: missing key(s) {', '.join(missing) or '-'}; "
                              f"unknown key(s) {', '.join(unknown) or '-'}")
        features = d["features"]
        if not isinstance(features, (list, tuple)) or not all(isinstance(f, str) for f in features):
            raise ConfigError("decode.rescorer.features must be a list of feature names")
        bias = d["bias"]
        if not isinstance(bias, (int, float)) or isinstance(bias, bool):
            raise ConfigError(f"decode.rescorer.bias must be a number, got {bias!r}")
        return cls(tuple(features), _finite_tuple(d["mean"], "mean"), _finite_tuple(d["scale"], "scale"),
                   _finite_tuple(d["weights"], "weights"), float(bias))
