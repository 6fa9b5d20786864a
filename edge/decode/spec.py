"""The decode spec: every parameter of network outputs -> detections -> 3-D findings.

Like the preprocess spec it travels inside the model file (ONNX ``metadata_props``),
so the runtime decodes exactly as the model was validated.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from edge.decode.rescoring import FindingRescorer
from edge.errors import ConfigError, InputError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class DecodeSpec:
    """All decoding parameters. Immutable; serialised with :meth:`to_json`.

    Per slice: a heatmap cell is a peak when it equals the maximum of its
    ``nms_kernel`` x ``nms_kernel`` neighbourhood and scores >= ``score_threshold``;
    the ``max_detections_per_slice`` best are kept. Across slices: a detection joins
    a track when its in-plane distance to the track's latest detection is within
    ``max(link_distance_mm, diameter / 2)``; a track survives up to ``max_gap_slices``
    consecutive slices without a detection; tracks with fewer than ``min_slices``
    detections are dropped. With ``max_elongation`` set, a finding whose z extent is
    more than ``max_elongation`` times its diameter (a vessel running along z) has its
    probability scaled by ``max_elongation / (z_extent / diameter)``. With ``min_z_span``
    set, a finding whose z span (extent plus one slice spacing: the slab it was seen
    in) is less than ``min_z_span`` times its diameter (a flat structure, or a blob seen
    on too few slices for its size) has its probability scaled by
    ``(z_span / (min_z_span * diameter)) ** 2``. A nodule is about as deep as it is wide.
    With ``rescorer`` set, a finding's probability is that model's output over its
    track's measurements instead (:mod:`edge.decode.rescoring`), and the two shape
    penalties above are not applied. ``report_threshold`` is the probability from
    which the model's findings are reported (overlays, SR) unless the site's
    ``outputs.report_threshold`` says otherwise: the validated operating point
    (``tools/tune_decode.py`` sets it at 1 false positive per scan), because what a
    probability means depends on how the model scores.
    """

    stride: int = 4  # model-input pixels per output cell
    score_threshold: float = 0.3
    nms_kernel: int = 3
    max_detections_per_slice: int = 32
    link_distance_mm: float = 5.0
    max_gap_slices: int = 1
    min_slices: int = 2
    max_elongation: Optional[float] = 3.0  # None: no penalty
    min_z_span: Optional[float] = None  # None: no penalty
    rescorer: Optional[FindingRescorer] = None  # None: max_score and the shape penalties
    report_threshold: Optional[float] = None  # None: the runtime's default
    version: int = field(default=1)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if not _is_int(self.stride) or not 1 <= self.stride <= 64:
            raise ConfigError(f"decode.stride must be an integer in 1..64, got {self.stride!r}")
        if not _is_number(self.score_threshold) or not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"decode.score_threshold must be a number in [0, 1], got {self.score_threshold!r}")
        if not _is_int(self.nms_kernel) or self.nms_kernel < 1 or self.nms_kernel % 2 == 0:
            raise ConfigError(f"decode.nms_kernel must be a positive odd integer, got {self.nms_kernel!r}")
        if not _is_int(self.max_detections_per_slice) or self.max_detections_per_slice < 1:
            raise ConfigError(
                f"decode.max_detections_per_slice must be a positive integer, got {self.max_detections_per_slice!r}"
            )
        if not _is_number(self.link_distance_mm) or not self.link_distance_mm > 0:
            raise ConfigError(f"decode.link_distance_mm must be a number > 0, got {self.link_distance_mm!r}")
        if not _is_int(self.max_gap_slices) or self.max_gap_slices < 0:
            raise ConfigError(f"decode.max_gap_slices must be an integer >= 0, got {self.max_gap_slices!r}")
        if not _is_int(self.min_slices) or self.min_slices < 1:
            raise ConfigError(f"decode.min_slices must be an integer >= 1, got {self.min_slices!r}")
        if self.max_elongation is not None and not (_is_number(self.max_elongation) and self.max_elongation > 0):
            raise ConfigError(f"decode.max_elongation must be a number > 0 or null, got {self.max_elongation!r}")
        if self.min_z_span is not None and not (_is_number(self.min_z_span) and 0 < self.min_z_span <= 1):
            raise ConfigError(f"decode.min_z_span must be a number in (0, 1] or null, got {self.min_z_span!r}")
        if self.rescorer is not None and not isinstance(self.rescorer, FindingRescorer):
            raise ConfigError(f"decode.rescorer must be a FindingRescorer or null, got {type(self.rescorer).__name__}")
        if self.report_threshold is not None and not (
                _is_number(self.report_threshold) and 0.0 <= self.report_threshold <= 1.0):
            raise ConfigError(f"decode.report_threshold must be a number in [0, 1] or null, got {self.report_threshold!r}")
        if self.version != 1:
            raise ConfigError(f"decode.version: unsupported version {self.version!r} (this runtime reads 1)")

    def to_dict(self) -> dict:
        d = asdict(self)
        for optional in ("rescorer", "report_threshold"):  # specs without them serialise as before
            if d[optional] is None:
                del d[optional]
        if self.rescorer is not None:
            d["rescorer"] = self.rescorer.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"decode spec must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"decode: unknown key(s) {', '.join(unknown)}")
        d = dict(d)
        if d.get("rescorer") is not None:
            d["rescorer"] = FindingRescorer.from_dict(d["rescorer"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "DecodeSpec":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"decode spec is not valid JSON: {e}") from None
        return cls.from_dict(d)


def read_decode_spec(path) -> DecodeSpec:
    """A decode spec from a JSON file; InputError naming the file when it is unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(path, f"cannot read the decode spec: {e.strerror or e}") from None
    try:
        return DecodeSpec.from_json(text)
    except ConfigError as e:
        raise InputError(path, str(e)) from None
