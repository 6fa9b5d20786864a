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
from edge.errors import DicomError, InputError  # noqa: E402
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


def test_worker_processes_give_the_same_results_as_one_process(tmp_path, blob_model):
    from edge.offline import ProcessPoolDetector, detect_folder

    _messy_folder(tmp_path / "in")
    write_series(tmp_path / "in" / "c", n_slices=8, spheres=(Sphere(0.0, 0.0, 0.0),), seed=4)
    write_series(tmp_path / "in" / "d", n_slices=2, seed=5)
    one_stages = {}
    with OnnxRuntimeRunner(blob_model, intra_op_threads=1) as runner:
        one = detect_folder(tmp_path / "in", runner, ModelSpecs.from_metadata(runner.custom_metadata()),
                            record=lambda stage, seconds: one_stages.setdefault(stage, []).append(seconds))
    assert len(one.series) == 3 and any("at least 3 needed" in r.reason for r in one.rejected)
    with ProcessPoolDetector(blob_model, workers=2) as pool:
        for _ in range(2):  # the pool is reused
            seen, stages = [], {}
            run = pool.detect(tmp_path / "in", on_series=lambda r: seen.append(r.series_uid),
                              record=lambda stage, seconds: stages.setdefault(stage, []).append(seconds))
            assert seen == [s.series_uid for s in one.series] == [s.series_uid for s in run.series]
            assert [(r.path, r.reason) for r in run.rejected] == [(r.path, r.reason) for r in one.rejected]
            for a, b in zip(one.series, run.series):
                assert a.findings == b.findings and a.slice_detections == b.slice_detections
            assert set(stages) == set(one_stages) == {"scan", "decode", "preprocess", "infer", "postprocess"}
            assert {k: len(v) for k, v in stages.items()} == {k: len(v) for k, v in one_stages.items()}
            assert len(stages["scan"]) == sum(1 for p in (tmp_path / "in").rglob("*") if p.is_file())
        with pytest.raises(DicomError, match="not a directory"):
            pool.detect(tmp_path / "missing")


def test_detect_cli_workers_and_threads(tmp_path, blob_model, capsys):
    from edge.cli import threads_per_worker

    _messy_folder(tmp_path / "in")
    serial, parallel = tmp_path / "serial.csv", tmp_path / "parallel.csv"
    assert main(["detect", str(tmp_path / "in"), "--model", str(blob_model), "--out", str(serial)]) == 0
    assert main(["detect", str(tmp_path / "in"), "--model", str(blob_model), "--out", str(parallel),
                 "--workers", "2", "--threads", "1"]) == 0
    assert serial.read_text() == parallel.read_text()
    assert threads_per_worker(2, cores=2) == 1 and threads_per_worker(3, cores=2) == 1
    assert threads_per_worker(1, cores=8) == 8 and threads_per_worker(2, cores=8) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["detect", str(tmp_path / "in"), "--workers", "0"])
    assert "--workers: must be >= 1, got 0" in capsys.readouterr().err


def test_a_model_with_a_rescorer_scores_its_findings_with_it(tmp_path):
    import dataclasses
    import math

    from edge.decode.rescoring import FindingRescorer
    from ingest_helpers import blob_specs

    # a rescorer that prefers short tracks: the tube along z must come out below the sphere
    rescorer = FindingRescorer(("log_depth_ratio_sq", "drift_per_z_span"), (0.0, 0.0), (1.0, 1.0), (-2.0, -1.0), 1.0)
    specs = blob_specs()
    model = build_blob_model(tmp_path / "rescored.onnx",
                             dataclasses.replace(specs, decode=dataclasses.replace(specs.decode, rescorer=rescorer)))
    tube = [Sphere(-20.0, 10.0, float(z)) for z in range(-40, 41)]
    series = write_series(tmp_path / "in" / "a", n_slices=16, spheres=[Sphere(8.0, -6.0, 0.0)] + tube, seed=4)
    out = tmp_path / "pred.csv"
    assert main(["detect", str(tmp_path / "in"), "--model", str(model), "--out", str(out)]) == 0
    rows = [r for r in csv.DictReader(open(out)) if r["seriesuid"] == series.series_uid]
    nodule = max((r for r in rows if math.hypot(float(r["coordX"]) - 8.0, float(r["coordY"]) + 6.0) < 3.0),
                 key=lambda r: float(r["probability"]))
    vessel = max((r for r in rows if math.hypot(float(r["coordX"]) + 20.0, float(r["coordY"]) - 10.0) < 3.0),
                 key=lambda r: float(r["probability"]))
    assert float(nodule["probability"]) > 0.5 > float(vessel["probability"])
