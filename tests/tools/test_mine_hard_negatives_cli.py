"""tools/mine_hard_negatives.py on a small DICOM training split written here, with a tiny random detector."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "edge" / "ingest"))
sys.path.insert(0, str(ROOT / "tests" / "toolchain" / "compression"))

from compression_helpers import tiny_teacher  # noqa: E402
from ingest_helpers import Sphere, write_series  # noqa: E402

from edge.decode.spec import DecodeSpec  # noqa: E402
from edge.model_file import ModelSpecs  # noqa: E402
from edge.preprocess.spec import PreprocessSpec  # noqa: E402
from toolchain.compression.checkpoint import save_checkpoint  # noqa: E402
from toolchain.training.hard_negatives import near_a_nodule, read_hard_negatives  # noqa: E402
from toolchain.training.slice_cache import cache_split  # noqa: E402


def tool():
    spec = importlib.util.spec_from_file_location("mine_hard_negatives", ROOT / "tools" / "mine_hard_negatives.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def dataset(tmp_path):
    spheres = (Sphere(20.0, 0.0, 4.0, radius=6.0),)
    s = write_series(tmp_path / "data" / "train" / "s", n_slices=8, spheres=spheres, seed=3)
    with open(tmp_path / "data" / "train" / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        w.writerow([s.series_uid, 20.0, 0.0, 4.0, 12.0])
    specs = ModelSpecs(PreprocessSpec(out_height=64, out_width=64, slices=3), DecodeSpec(stride=2), {"name": "tiny"})
    ckpt = save_checkpoint(tmp_path / "m.pt", tiny_teacher().eval(), specs, {"name": "tiny"})
    return tmp_path / "data", ckpt, specs


def test_mines_peaks_away_from_the_nodule_capped_per_series(dataset, tmp_path, capsys):
    data, ckpt, specs = dataset
    out = tmp_path / "hard" / "h.csv"
    assert tool().main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--min-score", "0.005",
                        "--max-per-series", "7"]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    rows = read_hard_negatives(out)
    (cached,) = cache_split(data / "train", specs.preprocess)
    assert 0 < len(rows) <= 7 and all(r.series_uid == cached.series_uid for r in rows)
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    assert not any(near_a_nodule(cached, r.slice_index, r.row, r.col) for r in rows)


def test_user_errors_exit_1_naming_the_problem(dataset, tmp_path, capsys):
    data, ckpt, _ = dataset
    for extra, message in ((["--min-score", "1.5"], "--min-score"), (["--max-per-series", "0"], "--max-per-series")):
        assert tool().main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o.csv")]
                           + extra) == 1
        assert message in capsys.readouterr().err
    assert tool().main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o.csv")]) == 1
    assert "missing split" in capsys.readouterr().err
    assert tool().main(["--checkpoint", str(tmp_path / "absent.pt"), "--data", str(data),
                        "--out", str(tmp_path / "o.csv")]) == 1
    assert "absent.pt" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
