"""JSON Lines out: one line per finding, one summary per result, exactly once, no patient data."""

import json

from outputs_helpers import ct_datasets, report_for

from edge.outputs.jsonl import JsonlWriter, read_jsonl


def test_lines_and_summary(tmp_path):
    datasets = ct_datasets()
    report = report_for(datasets, ((1.0, 2.0, 3.0, 5.0, 0.8), (4.0, 5.0, 6.0, 9.0, 0.7)), paths=["/spool/a"] * 3)
    JsonlWriter(tmp_path).write(report, overlays={1: "overlays/x.png"}, sr="sr/x.dcm")
    findings = read_jsonl(tmp_path / "findings.jsonl")
    (summary,) = read_jsonl(tmp_path / "series.jsonl")
    assert [f["index"] for f in findings] == [1, 2]
    assert findings[0]["overlay"] == "overlays/x.png" and "overlay" not in findings[1]
    assert findings[1]["x"] == 4.0 and findings[1]["diameter_mm"] == 9.0
    assert summary["n_findings"] == 2 and summary["sr"] == "sr/x.dcm"
    assert summary["sop_instance_uids"] == report.sop_instance_uids
    text = (tmp_path / "findings.jsonl").read_text() + (tmp_path / "series.jsonl").read_text()
    for secret in ("SECRET", "19450101", "/spool/"):
        assert secret not in text


def test_recovering_write_is_idempotent_and_repairs_partial_writes(tmp_path):
    datasets = ct_datasets()
    report = report_for(datasets)
    other = report_for(datasets, result_id="other.p1")
    writer = JsonlWriter(tmp_path)
    writer.write(other)
    writer.write(report)
    writer.write(report, recovering=True)  # already complete: nothing added
    assert len(read_jsonl(tmp_path / "series.jsonl")) == 2
    # a crash after the finding lines but before the summary, then a torn line
    with open(tmp_path / "findings.jsonl", "a") as f:
        f.write(json.dumps({"type": "finding", "result_id": "third.p1", "index": 1}) + "\n")
        f.write('{"type": "finding", "resu')
    third = report_for(datasets, result_id="third.p1")
    JsonlWriter(tmp_path).write(third, recovering=True)
    findings = read_jsonl(tmp_path / "findings.jsonl")
    assert [f["result_id"] for f in findings] == ["other.p1", report.result_id, "third.p1"]
    assert [s["result_id"] for s in read_jsonl(tmp_path / "series.jsonl")] == ["other.p1", report.result_id, "third.p1"]
