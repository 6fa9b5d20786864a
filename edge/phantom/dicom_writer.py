"""Writing a :class:`PhantomSeries` as a DICOM CT Image Storage series.

Explicit VR little endian with file meta information, one file per slice
(plus the optional localizer), synthetic patient identity.
"""

import datetime
from pathlib import Path
from typing import List, Optional

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from edge.geometry import SliceGeometry
from edge.phantom.series import PhantomSeries

STUDY_DATE = datetime.date(2000, 1, 1)  # fixed: output is a pure function of the seed


def _ds(series: PhantomSeries, sop_uid: str) -> Dataset:
    """Attributes shared by all images of the series."""
    acq, prof = series.acquisition, series.profile
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    date = STUDY_DATE.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = prof.manufacturer
    ds.ManufacturerModelName = prof.model
    ds.InstitutionName = "SYNTHETIC PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM CHEST CT (SYNTHETIC, NOT A PATIENT)"
    ds.SeriesDescription = f"PHANTOM {prof.name} {acq.slice_thickness:g}mm"
    ds.PatientName = f"PHANTOM^SEED{series.seed}"
    ds.PatientID = series.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = f"{prof.kvp:g}"
    ds.XRayTubeCurrent = int(acq.tube_current_ma)
    ds.ConvolutionKernel = prof.kernel
    ds.PatientPosition = "HFS" if prof.head_first else "FFS"
    if acq.contrast:
        ds.ContrastBolusAgent = "SYNTHETIC IODINE"
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = prof.bits_stored
    ds.HighBit = prof.bits_stored - 1
    ds.PixelRepresentation = 1 if prof.signed else 0
    ds.RescaleIntercept = f"{series.rescale_intercept:g}"
    ds.RescaleSlope = f"{series.rescale_slope:g}"
    ds.RescaleType = "HU"
    return ds


def _set_geometry(ds: Dataset, g: SliceGeometry) -> None:
    ds.Rows = g.rows
    ds.Columns = g.columns
    ds.PixelSpacing = [_ds_str(g.pixel_spacing[0]), _ds_str(g.pixel_spacing[1])]
    ds.ImagePositionPatient = [_ds_str(v) for v in g.position]
    ds.ImageOrientationPatient = [_ds_str(v) for v in (*g.row_direction, *g.column_direction)]


def _ds_str(v: float) -> str:
    """A decimal string of at most 16 characters."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if len(s) <= 16 else f"{v:.6g}"


def _set_pixels(ds: Dataset, pixels: np.ndarray, signed: bool) -> None:
    arr = np.ascontiguousarray(pixels.astype("<i2" if signed else "<u2"))
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"


def _set_padding(ds: Dataset, series: PhantomSeries) -> None:
    if series.padding is not None:
        ds.add_new(0x00280120, "SS" if series.profile.signed else "US", int(series.padding[0]))


def series_datasets(series: PhantomSeries) -> List[Dataset]:
    """One Dataset per image: the slices in instance order, then the localizer if any."""
    prof, acq = series.profile, series.acquisition
    out = []
    for i, (g, uid) in enumerate(zip(series.geometries, series.sop_uids)):
        ds = _ds(series, uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        _set_geometry(ds, g)
        ds.SliceThickness = _ds_str(acq.slice_thickness)
        if prof.write_spacing_between_slices:
            ds.SpacingBetweenSlices = _ds_str(acq.slice_spacing)
        ds.SliceLocation = _ds_str(g.slice_location)
        ds.GantryDetectorTilt = "0"
        ds.ReconstructionDiameter = _ds_str(acq.fov_mm)
        ds.DataCollectionDiameter = "500"
        ds.WindowCenter = f"{prof.window[0]:g}"
        ds.WindowWidth = f"{prof.window[1]:g}"
        _set_padding(ds, series)
        _set_pixels(ds, series.pixels[i], prof.signed)
        out.append(ds)
    loc = series.localizer
    if loc is not None:
        ds = _ds(series, loc.sop_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = series.n_slices + 1
        _set_geometry(ds, loc.geometry)
        ds.WindowCenter = "0"
        ds.WindowWidth = "2000"
        _set_pixels(ds, loc.pixels, prof.signed)
        out.append(ds)
    return out


def write_series(series: PhantomSeries, out_dir, prefix: Optional[str] = None) -> List[Path]:
    """Write the series into ``out_dir`` (created) as ``<prefix>0001.dcm`` ...; returns the paths.

    The localizer, when present, is written last as ``<prefix>localizer.dcm``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "CT" if prefix is None else prefix
    paths = []
    for ds in series_datasets(series):
        is_loc = "LOCALIZER" in ds.ImageType
        name = f"{prefix}localizer.dcm" if is_loc else f"{prefix}{int(ds.InstanceNumber):04d}.dcm"
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
