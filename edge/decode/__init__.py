"""Network outputs -> per-slice detections (:mod:`.peaks`) -> streaming 3-D findings (:mod:`.findings`),
all parameters in one :class:`DecodeSpec` (:mod:`.spec`). NumPy only."""

from edge.decode.findings import Finding, SeriesFindingAggregator
from edge.decode.peaks import (
    PEAK_DTYPE,
    SliceDetection,
    detections_to_patient,
    extract_peaks,
    extract_peaks_batch,
    grid_to_input,
    input_to_grid,
    local_maxima,
)
from edge.decode.spec import DecodeSpec

__all__ = [
    "DecodeSpec",
    "Finding",
    "PEAK_DTYPE",
    "SeriesFindingAggregator",
    "SliceDetection",
    "detections_to_patient",
    "extract_peaks",
    "extract_peaks_batch",
    "grid_to_input",
    "input_to_grid",
    "local_maxima",
]
