"""Synthetic chest-CT phantom series with ground-truth lung nodules, written as real DICOM.

NumPy, OpenCV and pydicom only (this package runs on the device for ``edge demo``).

    from edge.phantom import generate_series, write_series
    series = generate_series(seed=3, profile="ge_standard")   # in memory
    write_series(series, "out/series_0000")                   # DICOM files

Modules: anatomy (body and organs), vessels (lung trees), skeleton (ribs),
nodules, scanner (profiles and imaging chain), render (slab partial volume),
series (orchestration), dicom_writer, annotations (CSV tables), dataset (splits).
"""

from edge.phantom.annotations import ANNOTATION_COLUMNS, META_COLUMNS, SERIES_COLUMNS, PhantomSetWriter, read_table
from edge.phantom.dataset import (
    SPLIT_PROFILES,
    TEST_PROFILES,
    TRAIN_PROFILES,
    make_dataset,
    make_phantom_set,
    series_seed,
)
from edge.phantom.dicom_writer import series_datasets, write_series
from edge.phantom.nodules import NODULE_KINDS, NODULE_LOCATIONS, Nodule
from edge.phantom.scanner import PROFILES, Acquisition, ScannerProfile, get_profile
from edge.phantom.series import Localizer, PhantomSeries, generate_series

__all__ = [
    "ANNOTATION_COLUMNS",
    "META_COLUMNS",
    "SERIES_COLUMNS",
    "NODULE_KINDS",
    "NODULE_LOCATIONS",
    "PROFILES",
    "SPLIT_PROFILES",
    "TEST_PROFILES",
    "TRAIN_PROFILES",
    "Acquisition",
    "Localizer",
    "Nodule",
    "PhantomSeries",
    "PhantomSetWriter",
    "ScannerProfile",
    "generate_series",
    "get_profile",
    "make_dataset",
    "make_phantom_set",
    "read_table",
    "series_datasets",
    "series_seed",
    "write_series",
]
