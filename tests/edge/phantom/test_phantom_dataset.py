"""Phantom sets on disk: tables, split profiles, the CLIs."""

import importlib.util
from pathlib import Path

import pytest

from edge.phantom import (
    ANNOTATION_COLUMNS,
    META_COLUMNS,
    PROFILES,
    SPLIT_PROFILES,
    TEST_PROFILES,
    TRAIN_PROFILES,
    read_table,
    series_seed,
)

ROOT = Path(__file__).resolve().parents[3]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_test_split_profiles_are_never_seen_in_training():
    assert set(TRAIN_PROFILES).isdisjoint(TEST_PROFILES)
    assert set(SPLIT_PROFILES["val"]) <= set(TRAIN_PROFILES)
    assert set(SPLIT_PROFILES["test"]) == set(TEST_PROFILES)
    assert set(TRAIN_PROFILES) | set(TEST_PROFILES) == set(PROFILES)


def test_series_seeds_differ_between_splits_and_indices():
    seeds = {series_seed(0, split, i) for split in ("train", "val", "test") for i in range(20)}
    assert len(seeds) == 60
    assert series_seed(0, "train", 3) == series_seed(0, "train", 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    _tool("make_dataset").main(["--out", str(out), "--train", "2", "--val", "1", "--test", "2", "--seed", "4",
                                "--size", "64", "--slices", "6"])
    return out


def test_dataset_layout_and_tables(dataset):
    for split, n in (("train", 2), ("val", 1), ("test", 2)):
        root = dataset / split
        series = read_table(root / "series.csv")
        assert len(series) == n
        assert {r["profile"] for r in series} <= set(SPLIT_PROFILES[split])
        uids = {r["seriesuid"] for r in series}
        for r in series:
            files = sorted((root / r["folder"]).glob("*.dcm"))
            assert len(files) == int(r["n_slices"]) + 1  # plus the localizer
        ann = read_table(root / "annotations.csv")
        meta = read_table(root / "annotations_meta.csv")
        for table, cols in (("annotations.csv", ANNOTATION_COLUMNS), ("annotations_meta.csv", META_COLUMNS)):
            assert (root / table).read_text().splitlines()[0] == ",".join(cols)
        assert len(ann) == len(meta) == sum(int(r["n_nodules"]) for r in series)
        assert {r["seriesuid"] for r in ann} <= uids
    train_uids = {r["seriesuid"] for r in read_table(dataset / "train" / "series.csv")}
    test_uids = {r["seriesuid"] for r in read_table(dataset / "test" / "series.csv")}
    assert train_uids.isdisjoint(test_uids)


def test_make_phantoms_cli_writes_a_set(tmp_path, capsys):
    rc = _tool("make_phantoms").main(["--out", str(tmp_path), "--series", "1", "--seed", "2", "--profile",
                                      "ge_lung", "--size", "64", "--slices", "3", "--no-localizer"])
    assert rc == 0
    assert "[1/1] series_0000: ge_lung" in capsys.readouterr().out
    rows = read_table(tmp_path / "series.csv")
    assert rows[0]["profile"] == "ge_lung"
    assert len(list((tmp_path / "series_0000").glob("*.dcm"))) == 3


def test_make_phantoms_cli_reports_bad_size(tmp_path, capsys):
    rc = _tool("make_phantoms").main(["--out", str(tmp_path), "--series", "1", "--size", "8"])
    assert rc == 1
    assert "size must be" in capsys.readouterr().err
