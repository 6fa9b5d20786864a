import dataclasses

import pydicom

from edge.outputs.exporter import FALLBACK_REPORT_THRESHOLD, SeriesExporter
from edge.outputs.jsonl import FINDINGS_FILE, read_jsonl
from outputs_helpers import ct_datasets, report_for


def _two_findings(tmp_path):
    """A result over three CT files on disk with findings at probability 0.91 (6.5 mm) and 0.2 (5 mm)."""
    datasets = ct_datasets(n=3, size=32)
    paths = []
    for i, ds in enumerate(datasets):
        p = tmp_path / f"in{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return report_for(datasets, findings=((3.0, -2.0, 2.0, 6.5, 0.91), (-5.0, 4.0, 2.0, 5.0, 0.2)), paths=paths)


def test_report_threshold_limits_overlays_and_sr_but_jsonl_keeps_every_candidate(tmp_path):
    report = _two_findings(tmp_path)
    out = tmp_path / "results"
    written = SeriesExporter(out, report_threshold=0.5).export(report)
    assert sorted(written["overlays"]) == [1]
    lines = read_jsonl(out / FINDINGS_FILE)
    assert sorted(f["probability"] for f in lines) == [0.2, 0.91]
    sr = pydicom.dcmread(out / written["sr"])
    assert _diameters(sr.ContentSequence) == [6.5]


def _diameters(seq):
    found = []
    for item in seq:
        if "MeasuredValueSequence" in item and item.ConceptNameCodeSequence[0].CodeMeaning == "Diameter":
            found.append(float(item.MeasuredValueSequence[0].NumericValue))
        if "ContentSequence" in item:
            found += _diameters(item.ContentSequence)
    return found


def test_without_a_site_threshold_each_result_uses_its_models(tmp_path):
    report = _two_findings(tmp_path)
    models = dataclasses.replace(report, report_threshold=0.15)
    exporter = SeriesExporter(tmp_path / "results", report_threshold=None)
    assert exporter.threshold_for(models) == 0.15
    assert exporter.threshold_for(report) == FALLBACK_REPORT_THRESHOLD  # a model without one
    assert SeriesExporter(tmp_path / "r2", report_threshold=0.95).threshold_for(models) == 0.95  # the site's wins
    written = exporter.export(models)
    assert sorted(written["overlays"]) == [1, 2]
    summary = read_jsonl(tmp_path / "results" / "series.jsonl")[0]
    assert summary["model_report_threshold"] == 0.15
