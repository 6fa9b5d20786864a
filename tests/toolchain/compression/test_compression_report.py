import json
import subprocess
import sys
from pathlib import Path

import pytest

from compression_helpers import tiny_specs, tiny_teacher
from edge.errors import InputError
from toolchain.compression.checkpoint import save_checkpoint
from toolchain.compression.pruning import prune_by_ratio
from toolchain.compression.report import (
    ModelEntry,
    ReportRow,
    build_report,
    build_rows,
    check_targets,
    read_cpm,
    write_report,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def checkpoints(tmp_path):
    teacher = tiny_teacher().eval()
    student = prune_by_ratio(teacher, 0.5, "l1").eval()
    specs = tiny_specs()
    return (save_checkpoint(tmp_path / "teacher.pt", teacher, specs, {"name": "t"}),
            save_checkpoint(tmp_path / "student.pt", student, specs, {"name": "s"}))


def evaluation(path, cpm, ci=None):
    report = {"cpm": cpm, "froc": {}}
    if ci:
        report["cpm_ci"] = ci
    path.write_text(json.dumps(report))
    return str(path)


def row(name, params, macs, cpm):
    return ReportRow(name, f"{name}.pt", params, macs, 1.0, 1.2, cpm, None, params / 100, macs / 1000)


def test_rows_measure_size_latency_and_cpm_against_the_teacher(tmp_path, checkpoints):
    teacher, student = checkpoints
    entries = [ModelEntry("distilled", str(student), evaluation(tmp_path / "d.json", 0.8, [0.7, 0.9])),
               ModelEntry("teacher", str(teacher), evaluation(tmp_path / "t.json", 0.81))]
    rows = build_rows(entries, threads=1, runs=2, warmup=1, onnx_dir=tmp_path / "onnx")
    d, t = rows
    assert (d.name, t.name) == ("distilled", "teacher")
    assert t.parameter_ratio == 1.0 and t.mac_ratio == 1.0  # ratios are to the teacher, wherever its row is
    assert d.parameters < t.parameters and d.macs < t.macs
    assert d.parameter_ratio == pytest.approx(d.parameters / t.parameters)
    assert d.latency_ms > 0 and d.latency_p90_ms >= d.latency_ms
    assert (d.cpm, d.cpm_ci, t.cpm) == (0.8, [0.7, 0.9], 0.81)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["distilled.onnx", "teacher.onnx"]

    report = build_report(rows, threads=1, runs=2)
    write_report(report, tmp_path / "out" / "c.json", tmp_path / "out" / "c.md")
    assert json.loads((tmp_path / "out" / "c.json").read_text())["rows"][0]["name"] == "distilled"
    md = (tmp_path / "out" / "c.md").read_text()
    assert "| distilled |" in md and "0.800 [0.700, 0.900]" in md
    assert "CPM within 0.02 of the teacher's: met" in md
    assert "above the same architecture trained from scratch: n/a" in md


def test_targets():
    rows = [row("teacher", 100, 1000, 0.85), row("pruned", 25, 250, 0.80), row("distilled", 25, 250, 0.84),
            row("scratch", 25, 250, 0.81)]
    assert all(check_targets(rows).values())
    rows[2] = row("distilled", 31, 250, 0.82)
    got = list(check_targets(rows).values())
    assert got == [False, False, True]
    assert list(check_targets(rows[:1]).values()) == [None, None, None]


def test_bad_evaluation_json_names_the_file(tmp_path):
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"froc": {}}))
    with pytest.raises(InputError, match="eval.json.*cpm"):
        read_cpm(bad)


def test_cli_writes_json_and_markdown(tmp_path, checkpoints):
    teacher, student = checkpoints
    out = tmp_path / "res" / "compression.json"
    cmd = [sys.executable, str(ROOT / "tools" / "compression_report.py"), "--model", "teacher", str(teacher),
           "--model", "distilled", str(student), "--eval", "distilled", evaluation(tmp_path / "d.json", 0.5),
           "--runs", "1", "--warmup", "0", "--out-json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "| teacher |" in proc.stdout
    bad = subprocess.run(cmd[:-2] + ["--eval", "nobody", "x.json", "--out-json", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "nobody" in bad.stderr
