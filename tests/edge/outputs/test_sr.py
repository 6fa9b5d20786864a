"""The DICOM SR: a Comprehensive 3D SR with a TID 1500 report, readable by pydicom, referencing the series."""

import pydicom
import pytest
from outputs_helpers import ct_datasets, report_for

from edge.errors import InputError
from edge.outputs.sr import build_sr, send_sr, sr_uids, write_sr

pytest.importorskip("highdicom")

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
FINDINGS = ((3.0, -2.0, 2.0, 6.5, 0.91), (-7.25, 4.5, 0.5, 11.0, 0.6))


def walk(items):
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def test_sr_is_a_valid_comprehensive_3d_sr_referencing_the_series(tmp_path):
    datasets = ct_datasets()
    report = report_for(datasets, FINDINGS)
    path = write_sr(tmp_path / "sr.dcm", build_sr(report, datasets))
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == report.study_uid
    assert sr.SeriesInstanceUID != report.series_uid
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == sr_uids(report.result_id)[:2]
    assert sr.CompletionFlag == "COMPLETE"
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == report.series_uid
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence) == sorted(report.sop_instance_uids)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    items = list(walk(sr.ContentSequence))
    points = [i for i in items if i.ValueType == "SCOORD3D"]
    assert len(points) == 2
    for point, (x, y, z, _, _) in zip(points, FINDINGS):
        assert point.GraphicType == "POINT"
        assert [float(v) for v in point.GraphicData] == pytest.approx([x, y, z])
        assert point.ReferencedFrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    diameters = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "81827009"]
    assert [float(d.MeasuredValueSequence[0].NumericValue) for d in diameters] == pytest.approx([6.5, 11.0])
    assert {d.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for d in diameters} == {"mm"}
    groups = [i for i in items if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(groups) == 2
    names = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert "Nodule 1" in names and "Nodule 2" in names


def test_sr_uids_are_stable_per_result():
    datasets = ct_datasets()
    a = build_sr(report_for(datasets, result_id="1.2.3.p1"), datasets)
    b = build_sr(report_for(datasets, result_id="1.2.3.p1"), datasets)
    c = build_sr(report_for(datasets, result_id="1.2.3.p2"), datasets)
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID


def test_no_findings_is_still_a_report(tmp_path):
    datasets = ct_datasets()
    sr = pydicom.dcmread(write_sr(tmp_path / "sr.dcm", build_sr(report_for(datasets, ()), datasets)))
    items = list(walk(sr.ContentSequence))
    assert not [i for i in items if i.ValueType == "SCOORD3D"]
    findings = {i.ConceptCodeSequence[0].CodeMeaning for i in items
                if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"}
    assert findings == {"Nodule", "Absent"}  # finding type Nodule, evaluation: absent


def test_findings_need_a_frame_of_reference():
    datasets = ct_datasets()
    for d in datasets:
        del d.FrameOfReferenceUID
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        build_sr(report_for(datasets), datasets)


def test_send_sr_to_a_pacs_node():
    from pynetdicom import AE, evt

    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(COMPREHENSIVE_3D_SR)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        datasets = ct_datasets()
        sr = build_sr(report_for(datasets), datasets)
        status = send_sr(sr, "127.0.0.1", server.server_address[1], "PACS", "CT_EDGE", timeout_s=10)
    finally:
        server.shutdown()
    assert status == 0
    assert received[0].SOPInstanceUID == sr.SOPInstanceUID
