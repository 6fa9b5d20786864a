"""Small inputs for the output writer tests: CT headers and a series report."""

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from edge.outputs.report import FindingRecord, SeriesReport


def ct_datasets(n=3, size=32, spacing=1.0, with_pixels=True):
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SECRET^NAME", "SECRET-ID", "19450101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
            "20240101", "120000", "A1", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, i + 1
        ds.ImagePositionPatient = [-(size - 1) / 2 * spacing, -(size - 1) / 2 * spacing, 2.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if with_pixels:
            ds.PixelData = np.full((size, size), 174, "<i2").tobytes()
        out.append(ds)
    return out


def report_for(datasets, findings=((3.0, -2.0, 2.0, 6.5, 0.91),), result_id=None, paths=None):
    first = datasets[0]
    uids = [d.SOPInstanceUID for d in datasets]
    records = [
        FindingRecord(index=i + 1, x=x, y=y, z=z, diameter_mm=d, probability=p, max_score=p, n_slices=2,
                      z_extent_mm=2.0, first_slice_location=z - 1, last_slice_location=z + 1, key_slice_location=z,
                      key_sop_instance_uid=uids[1], key_frame_index=0)
        for i, (x, y, z, d, p) in enumerate(findings)
    ]
    return SeriesReport(
        result_id=result_id or f"{first.SeriesInstanceUID}.p1", part=1, study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID, findings=records, sop_instance_uids=uids, n_slices=len(uids),
        model={"name": "tiny", "version": "0.1"},
        sources={u: str(p) for u, p in zip(uids, paths)} if paths else {},
    )
