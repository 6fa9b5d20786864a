"""``edge detect``: a messy folder in, LUNA16 predictions out, every unusable file reported."""

import csv
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "ingest"))
from ingest_helpers import Sphere, build_blob_model, write_series  # noqa: E402

from edge.backends.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from edge.cli import main  # noqa: E402
from edge.detector import SeriesDetector  # noqa: E402
from edge.dicom.reader import read_frames  # noqa: E402
from edge.errors import InputError  # noqa: E402
from edge.model_file import ModelSpecs  # noqa: E402


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    return build_blob_model(tmp_path_factory.mktemp("model") / "blob.onnx")


def _messy_folder(root: Path):
    a = write_series(root / "patient1" / "study" / "a", n_slices=10, spheres=(Sphere(8.0, -6.0, 0.0),), seed=1)
    b = write_series(root / "b", n_slices=10, spheres=(Sphere(-20.0, 10.0, 0.0),), seed=2)
    (root / "notes.txt").write_text("not an image")
    mr = pydicom.dcmread(b.paths[0])
    mr.Modality = "MR"
    mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    mr.file_meta.MediaStorageSOPClassUID = mr.SOPClassUID
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    mr.save_as(root / "b" / "mr.dcm")
    data = a.paths[3].read_bytes()
    a.paths[3].write_bytes(data[: len(data) // 2])  # truncated mid pixel data
    return a, b


def test_detect_folder_writes_predictions_and_reports_bad_files(tmp_path, blob_model, capsys):
    a, b = _messy_folder(tmp_path / "in")
    out = tmp_path / "pred.csv"
    assert main(["detect", str(tmp_path / "in"), "--model", str(blob_model), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert set(rows[0]) >= {"seriesuid", "coordX", "coordY", "coordZ", "probability"}
    by_series = {r["seriesuid"] for r in rows}
    assert by_series == {a.series_uid, b.series_uid}
    best_a = max((r for r in rows if r["seriesuid"] == a.series_uid), key=lambda r: float(r["probability"]))
    assert abs(float(best_a["coordX"]) - 8.0) < 2.0 and abs(float(best_a["coordY"]) + 6.0) < 2.0
    rejected = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(open(out.with_suffix(".rejected.csv")))}
    assert set(rejected) == {"notes.txt", "mr.dcm", a.paths[3].name}
    assert "not CT" in rejected["mr.dcm"] or "MR" in rejected["mr.dcm"]
    assert "trunc" in rejected[a.paths[3].name].lower() or "short" in rejected[a.paths[3].name].lower()
    assert "2 series, 19 slices" in capsys.readouterr().out


def test_per_slice_outputs_feed_the_per_image_metrics(tmp_path, blob_model):
    from toolchain.evaluation.io import read_annotations, read_predictions, read_slice_positions
    from toolchain.evaluation.per_slice import per_slice_metrics

    series = write_series(tmp_path / "in" / "s", n_slices=12)
    sl, im = tmp_path / "slices.csv", tmp_path / "images.csv"
    assert main(["detect", str(tmp_path / "in"), "--model", str(blob_model), "--out", str(tmp_path / "p.csv"),
                 "--slice-predictions", str(sl), "--image-positions", str(im)]) == 0
    images = list(csv.DictReader(open(im)))
    z = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in series.paths)
    assert [float(r["coordZ"]) for r in images] == pytest.approx(z, abs=1e-3)  # every image once, in order
    rows = list(csv.DictReader(open(sl)))
    assert rows and all(min(abs(float(r["coordZ"]) - v) for v in z) < 1e-3 for r in rows)
    sphere = series.spheres[0]
    on_sphere = [r for r in rows if abs(float(r["coordZ"]) - sphere.z) < sphere.radius]
    assert on_sphere and all(abs(float(r["coordX"]) - sphere.x) < 2.0 for r in on_sphere if float(r["probability"]) > 0.5)

    (tmp_path / "ann.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                      f"{series.series_uid},{sphere.x},{sphere.y},{sphere.z},{2 * sphere.radius}\n")
    m = per_slice_metrics(read_annotations(tmp_path / "ann.csv"), read_predictions(sl), read_slice_positions(im), 0.5)
    assert m.sensitivity > 0.5 and m.images == len(z)


def test_detect_on_a_missing_folder_is_one_line_error(tmp_path, blob_model, capsys):
    assert main(["detect", str(tmp_path / "nope"), "--model", str(blob_model)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "not a directory" in err[0]


def test_two_slices_at_one_position_are_a_user_error_naming_the_file(tmp_path, blob_model):
    s = write_series(tmp_path / "s", n_slices=6, seed=3)
    frames = [f for p in s.paths for f in read_frames(p)]
    frames.append(frames[2])
    with OnnxRuntimeRunner(blob_model) as runner:
        specs = ModelSpecs.from_metadata(runner.custom_metadata())
        with pytest.raises(InputError) as e:
            SeriesDetector(runner, specs).detect(frames)
    assert str(s.paths[2]) in str(e.value)
