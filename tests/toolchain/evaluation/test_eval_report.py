import json

import numpy as np

from toolchain.evaluation.bootstrap import bootstrap_froc
from toolchain.evaluation.froc import Candidates, Nodules, evaluate_froc, nodule_groups, per_type_sensitivity
from toolchain.evaluation.report import build_report, format_summary, plot_froc, write_json


def small_result():
    nodules = Nodules(("A", "B"), np.zeros((2, 3)), np.array([10.0, 4.0]))
    candidates = Candidates(("A", "A", "B", "C"), np.array([[0, 0, 1.0], [60, 0, 0], [0, 0, 0], [0, 0, 0]]),
                            np.array([0.9, 0.7, 0.4, 0.8]))
    return evaluate_froc(nodules, candidates, ("A", "B", "C")), nodules


def test_report_is_strict_json_and_summary_ends_with_cpm(tmp_path):
    froc, nodules = small_result()
    boot = bootstrap_froc(froc.matching, samples=100, seed=0)
    per_type = per_type_sensitivity(froc.matching, nodule_groups(nodules), {"1 FP/scan": 0.8, "none": np.inf})
    report = build_report(froc, "3 scans", boot, per_type)
    text = json.dumps(report, allow_nan=False)  # +inf thresholds must have become null
    loaded = json.loads(text)
    assert loaded["cpm"] == froc.cpm
    assert [p["fp_per_scan"] for p in loaded["operating_points"]] == list(froc.fp_rates)
    assert loaded["froc_curve"]["threshold"][0] is None
    assert loaded["per_type"]["all"]["none"]["threshold"] is None
    assert loaded["cpm_ci"] == [boot.cpm_lower, boot.cpm_upper]
    summary = format_summary(report)
    assert summary.splitlines()[-1] == f"CPM {froc.cpm:.4f}"
    assert "95% CI" in summary
    write_json(report, tmp_path / "out" / "r.json")
    assert json.loads((tmp_path / "out" / "r.json").read_text())["counts"]["scans"] == 3


def test_plot_writes_a_png(tmp_path):
    froc, _ = small_result()
    path = tmp_path / "plots" / "froc.png"
    plot_froc(froc, path, bootstrap_froc(froc.matching, samples=50, seed=0))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
