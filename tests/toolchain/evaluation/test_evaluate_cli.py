import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "tools" / "evaluate.py"

ANNOTATIONS = "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\nA,50,0,0,6\nB,0,0,0,8\n"
# The hand case of test_eval_froc.py: CPM 4.5/7 = 0.6429 over 2 scans, (2/3 + 1/2 + 4)/7 = 0.7381 over 4.
PREDICTIONS = ("seriesuid,coordX,coordY,coordZ,probability\n"
               "A,1,0,0,0.9\nA,0,2,0,0.5\nA,100,0,0,0.8\nA,50,0,2.9,0.3\nA,0,-100,0,0.6\n"
               "B,30,30,30,0.6\nB,0,0,3.5,0.6\nB,-40,0,0,0.2\nB,60,0,0,0.1\n")


def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a.csv").write_text(ANNOTATIONS)
    (tmp_path / "p.csv").write_text(PREDICTIONS)
    (tmp_path / "series.csv").write_text("seriesuid,profile,n_slices,folder\nA,p,7,a\nB,p,7,b\nC,p,7,c\nD,p,7,d\n")
    (tmp_path / "m.csv").write_text("seriesuid,index,type,location,diameter_mm\nA,0,solid,central,10\n"
                                    "A,1,ground_glass,juxta_pleural,5\nB,0,solid,juxta_pleural,8\n")
    (tmp_path / "z.csv").write_text("seriesuid,coordZ\n" + "".join(f"{u},{z}\n" for u in "AB" for z in range(-6, 7, 2)))
    (tmp_path / "ps.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0,0.9\nB,9,9,0,0.9\n")
    return tmp_path


def test_end_to_end_subprocess(files):
    r = subprocess.run([sys.executable, str(SCRIPT), "--predictions", str(files / "p.csv"),
                        "--annotations", str(files / "a.csv")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "CPM 0.6429"
    assert "union of series" in r.stdout


def test_end_to_end_with_every_output(files, capsys):
    cli = load_cli()
    rc = cli.main(["--predictions", str(files / "p.csv"), "--annotations", str(files / "a.csv"),
                   "--series-list", str(files / "series.csv"), "--annotations-meta", str(files / "m.csv"),
                   "--bootstrap", "200", "--seed", "0", "--threshold", "0.5",
                   "--slice-predictions", str(files / "ps.csv"), "--slices", str(files / "z.csv"),
                   "--out-json", str(files / "out" / "r.json"), "--out-plot", str(files / "out" / "froc.png")])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip().splitlines()[-1] == "CPM 0.7381"
    report = json.loads((files / "out" / "r.json").read_text())
    assert report["counts"]["scans"] == 4
    assert report["cpm_ci"][0] <= report["cpm"] <= report["cpm_ci"][1]
    assert report["per_type"]["type:ground_glass"]["p>=0.5"]["sensitivity"] == 0.0
    assert report["per_slice"]["detected_lesion_slices"] == 1 and report["per_slice"]["false_positives"] == 1
    assert (files / "out" / "froc.png").stat().st_size > 0


@pytest.mark.parametrize("bad, expected", [
    ("p.csv", "missing column(s) probability"),
    ("missing.csv", "file not found"),
])
def test_bad_input_exits_1_with_one_line(files, capsys, bad, expected):
    (files / "p.csv").write_text("seriesuid,coordX,coordY,coordZ,prob\nA,1,2,3,0.5\n")
    rc = load_cli().main(["--predictions", str(files / bad), "--annotations", str(files / "a.csv")])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and expected in err and bad in err


def test_inconsistent_options_exit_1(files, capsys):
    cli = load_cli()
    assert cli.main(["--predictions", str(files / "p.csv"), "--annotations", str(files / "a.csv"),
                     "--scans", "1"]) == 1
    assert "--scans 1" in capsys.readouterr().err
    assert cli.main(["--predictions", str(files / "p.csv"), "--annotations", str(files / "a.csv"),
                     "--slice-predictions", str(files / "ps.csv")]) == 1
    assert "needs --slices and --threshold" in capsys.readouterr().err


def test_evaluation_never_imports_torch():
    code = ("import sys, toolchain.evaluation, toolchain.evaluation.io, toolchain.evaluation.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy', 'sklearn')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
