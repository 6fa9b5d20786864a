"""tools/make_independent_phantoms.py: a small set end to end, and a bad option as one line and exit 1."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool():
    spec = importlib.util.spec_from_file_location("make_independent_phantoms", ROOT / "tools" / "make_independent_phantoms.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_a_set_that_edge_reads(tmp_path, capsys):
    from edge.folder import group_series

    out = tmp_path / "ind"
    assert tool().main(["--out", str(out), "--series", "2", "--size", "96", "--slices", "3", "--seed", "4"]) == 0
    assert "[2/2] series_0001" in capsys.readouterr().out
    uids = {r["seriesuid"] for r in csv.DictReader(open(out / "series.csv"))}
    groups, rejected = group_series(out)
    assert {g.series_uid for g in groups} == uids and len(uids) == 2
    assert sorted(Path(r.path).name for r in rejected) == ["annotations.csv", "annotations_meta.csv", "series.csv"]


def test_bad_option_is_one_line_and_exit_1(tmp_path, capsys):
    assert tool().main(["--out", str(tmp_path / "x"), "--series", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "series must be >= 1" in err[0]
