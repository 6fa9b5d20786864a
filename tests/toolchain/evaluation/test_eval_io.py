import numpy as np
import pytest

from edge.errors import InputError
from toolchain.evaluation.io import (
    read_annotations,
    read_annotations_meta,
    read_predictions,
    read_series_list,
    read_slice_positions,
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_luna16_predictions_with_extra_columns_and_bom(tmp_path):
    p = write(tmp_path, "p.csv", "\ufeffseriesuid,coordX,coordY,coordZ,probability,extra\n"
                                 "1.2.3,-10.5,20,30.25,0.75,x\n\n1.2.4, 1,2,3 ,0.1,y\n")
    c = read_predictions(p)
    assert c.seriesuids == ("1.2.3", "1.2.4")
    np.testing.assert_array_equal(c.centers, [[-10.5, 20, 30.25], [1, 2, 3]])
    np.testing.assert_array_equal(c.probabilities, [0.75, 0.1])


def test_header_only_files_are_empty_tables(tmp_path):
    c = read_predictions(write(tmp_path, "p.csv", "seriesuid,coordX,coordY,coordZ,probability\n"))
    assert len(c) == 0 and c.centers.shape == (0, 3)


@pytest.mark.parametrize("text, message", [
    ("seriesuid,coordX,coordY,coordZ\nA,1,2,3\n", "missing column(s) diameter_mm"),
    ("", "empty file"),
    ("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,1,2,x,5\n", "line 2: coordZ is not a number"),
    ("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,1,2,3,nan\n", "line 2: diameter_mm is not finite"),
    ("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,1,2,3\n", "line 2: 4 fields, header has 5"),
    ("seriesuid,coordX,coordY,coordZ,diameter_mm\n,1,2,3,4\n", "line 2: empty seriesuid"),
])
def test_bad_annotations_name_the_file_and_the_problem(tmp_path, text, message):
    path = write(tmp_path, "ann.csv", text)
    with pytest.raises(InputError) as info:
        read_annotations(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(InputError, match="nope.csv: file not found"):
        read_predictions(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(InputError, match="bin.csv: cannot read CSV"):
        read_predictions(binary)


def test_series_list_uses_the_seriesuid_column(tmp_path):
    path = write(tmp_path, "series.csv", "seriesuid,profile,n_slices,folder\nA,x,10,a\nB,y,12,b\nA,x,10,a\n")
    assert read_series_list(path) == ("A", "B")
    with pytest.raises(InputError, match="missing column"):
        read_series_list(write(tmp_path, "bad.csv", "uid\nA\n"))


def test_annotations_meta_aligns_by_series_and_index(tmp_path):
    ann = read_annotations(write(tmp_path, "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                                    "A,0,0,0,10\nB,0,0,0,4\nA,9,9,9,7\n"))
    meta_csv = write(tmp_path, "m.csv", "seriesuid,index,type,location,diameter_mm\n"
                                        "A,1,ground_glass,juxta_pleural,7\nB,0,solid,central,\n")
    meta = read_annotations_meta(meta_csv, ann)
    assert meta.types == ("", "solid", "ground_glass")
    assert meta.locations == ("", "central", "juxta_pleural")
    assert np.isnan(meta.diameters[0]) and np.isnan(meta.diameters[1]) and meta.diameters[2] == 7.0
    with pytest.raises(InputError, match="m2.csv: line 2: series A has 2 annotated nodule"):
        read_annotations_meta(write(tmp_path, "m2.csv", "seriesuid,index,type\nA,2,solid\n"), ann)
    with pytest.raises(InputError, match="duplicate entry"):
        read_annotations_meta(write(tmp_path, "m3.csv", "seriesuid,index,type\nA,0,solid\nA,0,solid\n"), ann)


def test_slice_positions_are_sorted_per_series(tmp_path):
    z = read_slice_positions(write(tmp_path, "z.csv", "seriesuid,coordZ\nA,2\nA,-1\nB,0\nA,0.5\n"))
    np.testing.assert_array_equal(z["A"], [-1, 0.5, 2])
    np.testing.assert_array_equal(z["B"], [0])
