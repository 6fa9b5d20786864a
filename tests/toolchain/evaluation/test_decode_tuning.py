import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "edge" / "ingest"))

from ingest_helpers import Sphere, build_blob_model, write_series  # noqa: E402

from edge.decode.findings import Finding  # noqa: E402
from edge.decode.spec import DecodeSpec  # noqa: E402
from edge.errors import InputError  # noqa: E402
from toolchain.evaluation.decode_tuning import AnnotatedFolder, cross_validated_prior_cpm, grid_search  # noqa: E402
from toolchain.evaluation.rescorer_fit import findings_cpm  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[3] / "tools" / "tune_decode.py"


def finding(x, score, extent, diameter=10.0, spacing=1.0):
    return Finding(x=x, y=0.0, z=0.0, diameter_mm=diameter, probability=score, max_score=score, n_slices=3,
                   z_extent_mm=extent, first_slice_location=-extent / 2, last_slice_location=extent / 2,
                   key_slice_location=0.0, slice_spacing_mm=spacing)


def write_tables(folder: Path, nodules, series_uids):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        w.writerows(nodules)
    with open(folder / "series.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid"])
        w.writerows([u] for u in series_uids)


def test_grid_ranks_the_prior_that_demotes_a_vessel_first(tmp_path):
    write_tables(tmp_path, [("1.2.3", 0.0, 0.0, 0.0, 10.0)], ["1.2.3", "1.2.4"])
    folder = AnnotatedFolder.open(tmp_path)
    found = {"1.2.3": [finding(0.0, 0.6, extent=9.0), finding(50.0, 0.9, extent=60.0)],  # nodule, vessel
             "1.2.4": [finding(0.0, 0.8, extent=0.0, diameter=20.0)]}  # flat blob on one slice
    points = grid_search([found], [folder], DecodeSpec(), [None, 1.0], [None, 0.7])
    best = points[0]
    assert (best.max_elongation, best.min_z_span) == (1.0, 0.7) and best.cpm == (1.0,)
    none = next(p for p in points if p.max_elongation is None and p.min_z_span is None)
    # both false positives outrank the nodule: found only from 1 FP/scan on (2 FPs, 2 scans)
    assert none.mean_cpm == pytest.approx(4 / 7)


def test_cross_validated_prior_scores_each_series_with_the_pair_chosen_without_it(tmp_path):
    # series 1, 3 (fold 0): an elongated nodule above a round false positive, so the prior hurts;
    # series 2, 4 (fold 1): a vessel above a round nodule, so the prior helps
    write_tables(tmp_path, [(u, 0.0, 0.0, 0.0, 10.0) for u in "1234"], list("1234"))
    folder = AnnotatedFolder.open(tmp_path)
    hurt = [finding(0.0, 0.6, extent=30.0), finding(50.0, 0.5, extent=10.0)]
    helped = [finding(0.0, 0.6, extent=9.0), finding(50.0, 0.9, extent=60.0)]
    found = {"1": hurt, "2": helped, "3": hurt, "4": helped}
    cv = cross_validated_prior_cpm([found], [folder], DecodeSpec(), [None, 1.0], [None], folds=2)
    # fold 0 held out: the prior wins on fold 1 and scales the nodule 0.6 -> 0.6 / 3; fold 1: no prior
    by_hand = {"1": np.array([0.2, 0.5]), "3": np.array([0.2, 0.5]), "2": np.array([0.6, 0.9]),
               "4": np.array([0.6, 0.9])}
    assert cv == pytest.approx((findings_cpm(found, by_hand, folder.nodules, folder.scans),))
    assert cv[0] < grid_search([found], [folder], DecodeSpec(), [None, 1.0], [None])[0].mean_cpm


def test_folder_without_tables_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="series.csv"):
        write_tables(tmp_path, [], [])
        (tmp_path / "series.csv").unlink()
        AnnotatedFolder.open(tmp_path)


def test_cli_tunes_on_real_series_through_the_runtime(tmp_path):
    data = tmp_path / "val"
    tube = [Sphere(-12.0, 10.0, float(z)) for z in np.arange(-30.0, 31.0, 1.0)]
    a = write_series(data / "s0", n_slices=30, spheres=[Sphere(8.0, -6.0, 0.0)] + tube, seed=0)
    b = write_series(data / "s1", n_slices=30, spheres=tube, seed=1)
    write_tables(data, [(a.series_uid, 8.0, -6.0, 0.0, 14.0)], [a.series_uid, b.series_uid])
    model = build_blob_model(tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--data", str(data),
                        "--max-elongation", "none,1", "--min-z-span", "none", "--out", str(tmp_path / "d.json"),
                        "--json", str(tmp_path / "grid.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    chosen = DecodeSpec.from_json((tmp_path / "d.json").read_text())
    assert chosen.max_elongation == 1.0 and chosen.min_z_span is None
    grid = json.loads((tmp_path / "grid.json").read_text())["grid"]
    assert grid[0]["mean_cpm"] > grid[1]["mean_cpm"] and grid[1]["max_elongation"] is None


def test_cli_bad_grid_value_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "m.onnx", "--data", str(tmp_path),
                        "--max-elongation", "1,abc", "--out", str(tmp_path / "d.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "'abc'" in r.stderr
    assert not (tmp_path / "d.json").exists()


def test_cli_rescorer_is_fitted_cross_validated_and_kept_only_when_it_wins(tmp_path):
    # four series, each with a nodule (a sphere) and a tube along z that the blob model scores high too
    data = tmp_path / "val"
    nodules, uids = [], []
    for k in range(4):
        tube = [Sphere(-12.0, 10.0, float(z), radius=6.0) for z in np.arange(-30.0, 31.0, 1.0)]
        s = write_series(data / f"s{k}", n_slices=24, spheres=[Sphere(8.0, -6.0, 0.0, radius=5.0 + k)] + tube, seed=k)
        nodules.append((s.series_uid, 8.0, -6.0, 0.0, 2 * (5.0 + k)))
        uids.append(s.series_uid)
    write_tables(data, nodules, uids)
    model = build_blob_model(tmp_path / "m.onnx")

    def tune(max_elongation, out, folds=2):
        r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--data", str(data),
                            "--max-elongation", max_elongation, "--min-z-span", "none", "--rescorer",
                            "--rescorer-l2", "1,10", "--folds", str(folds), "--out", str(out / "d.json"),
                            "--json", str(out / "grid.json")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return (r.stdout, DecodeSpec.from_json((out / "d.json").read_text()),
                json.loads((out / "grid.json").read_text()))

    # without a shape prior the tubes outrank some nodules; the held-out rescorer ranks every nodule first
    stdout, chosen, report = tune("none", tmp_path / "a")
    rows = report["rescorer_cross_validated"]
    assert [row["l2"] for row in rows] == [1.0, 10.0] and report["folds"] == 2
    assert report["grid"][0]["mean_cpm"] < 0.95 and rows[0]["mean_cpm"] == pytest.approx(1.0)
    assert report["shape_prior_cross_validated"]["mean_cpm"] == pytest.approx(report["grid"][0]["mean_cpm"])
    assert chosen.rescorer is not None and "chosen: the rescorer (l2 1," in stdout
    assert chosen.max_elongation is None
    assert 0.0 < chosen.report_threshold <= 1.0 and report["report_fp_per_scan"] == 1.0
    # a shape prior as good under the same cross-validation keeps the spec free of the rescorer (it must
    # win, not tie); leave-one-out, so that every training fold holds a series where the tube outranks the nodule
    stdout, chosen, report = tune("none,1", tmp_path / "b", folds=4)
    assert report["grid"][0]["mean_cpm"] == pytest.approx(1.0)
    assert report["shape_prior_cross_validated"]["mean_cpm"] == pytest.approx(1.0)
    assert chosen.rescorer is None and chosen.max_elongation == 1.0
    assert 0.0 < chosen.report_threshold <= 1.0  # from the shape prior's probabilities


def test_cli_bad_rescorer_option_is_one_line(tmp_path):
    for bad, message in ((["--rescorer-l2", "none"], "'none'"), (["--rescorer-l2", "-1"], "penalties"),
                         (["--folds", "1"], "--folds")):
        r = subprocess.run([sys.executable, str(SCRIPT), "--model", "m.onnx", "--data", str(tmp_path), "--rescorer",
                            *bad, "--out", str(tmp_path / "d.json")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
