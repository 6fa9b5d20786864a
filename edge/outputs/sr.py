"""DICOM Structured Report of a series result: TID 1500 Measurement Report in a Comprehensive 3D SR.

One measurement group (TID 1410, planar ROI) per finding: a tracking
identifier, finding type *Nodule* at finding site *Lung*, the centre as an
SCOORD3D POINT in the source series' frame of reference (patient mm), and the
diameter in mm. Without findings, one group (TID 1501) says Finding: Absent,
so that the PACS shows the series was analysed. the algorithm is identified by the model card's name and
version. The SR belongs to the source study (patient and study attributes are
copied from the evidence by highdicom, as PACS filing needs) and references
every analysed instance as evidence. Its UIDs are derived from the result id, so
writing a result again after a restart gives the same instance.

highdicom is imported only when an SR is built; pynetdicom only when one is sent.
"""

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from edge.errors import InputError, MissingDependencyError
from edge.ingest.spool import write_durably
from edge.outputs.report import SeriesReport

UID_NAMESPACE = "ct-edge-sr-v1"
SR_SERIES_NUMBER = 9100
CT_CHEST = ("24627-2", "LN", "CT Chest")


def sr_uids(result_id: str):
    """(SeriesInstanceUID, SOPInstanceUID, device UID) of the SR of a result: stable across re-exports."""
    return (
        generate_uid(entropy_srcs=[UID_NAMESPACE, result_id, "series"]),
        generate_uid(entropy_srcs=[UID_NAMESPACE, result_id, "instance"]),
        generate_uid(entropy_srcs=[UID_NAMESPACE, "device"]),
    )


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise MissingDependencyError("writing DICOM SR needs the 'highdicom' package (pip install highdicom)") from None
    return highdicom


def build_sr(report: SeriesReport, evidence: Sequence[Dataset], manufacturer: str = "ct-edge") -> Dataset:
    """The SR dataset of ``report``; ``evidence`` are the analysed instances' headers (no pixels needed)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    if not evidence:
        raise InputError(report.result_id, "an SR needs at least one source instance as evidence")
    frame_of_reference = str(getattr(evidence[0], "FrameOfReferenceUID", "") or "")
    if report.findings and not frame_of_reference:
        raise InputError(report.result_id, "the source series has no FrameOfReferenceUID: finding centres cannot be placed")
    series_uid, sop_uid, device_uid = sr_uids(report.result_id)
    name = str(report.model.get("name") or "ct-edge detector")
    version = str(report.model.get("version") or "unknown")
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=device_uid, name=name),
        )
    )
    groups = []
    for f in report.findings:
        tracking = hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[UID_NAMESPACE, report.result_id, "finding", str(f.index)]),
            identifier=f"Nodule {f.index}",
        )
        centre = hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([[f.x, f.y, f.z]], dtype=float),
            frame_of_reference_uid=frame_of_reference,
        )
        diameter = hd.sr.Measurement(name=codes.SCT.Diameter, value=float(f.diameter_mm), unit=codes.UCUM.Millimeter)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=centre,
                finding_type=codes.SCT.Nodule,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
                measurements=[diameter],
            )
        )
    if not groups:  # TID 1500 needs one group: state that no nodule was found
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[UID_NAMESPACE, report.result_id, "none"]), identifier="Lungs"),
                finding_type=codes.SCT.Nodule,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=codes.SCT.Absent)],
            )
        )
    content = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=hd.sr.CodedConcept(*CT_CHEST),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=content[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=int(report.part),
        manufacturer=manufacturer,
        is_complete=True,
        series_description="CT lung nodule detection",
    )


def write_sr(path, sr: Dataset) -> Path:
    """Write the SR as a DICOM file, atomically."""
    import io

    import pydicom

    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    except TypeError:  # pydicom < 3 names it differently
        pydicom.dcmwrite(buffer, sr, write_like_original=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_durably(path, buffer.getvalue())


def send_sr(sr: Dataset, host: str, port: int, called_ae: str, calling_ae: str, timeout_s: float = 30.0) -> int:
    """C-STORE the SR to a PACS node; returns the DIMSE status (0x0000 = stored)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(sr.SOPClassUID)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"PACS {called_ae}@{host}:{port} did not accept the association")
    try:
        status = assoc.send_c_store(sr)
    finally:
        assoc.release()
    if status is None or "Status" not in status:
        raise ConnectionError(f"PACS {called_ae}@{host}:{port} sent no C-STORE response")
    return int(status.Status)
