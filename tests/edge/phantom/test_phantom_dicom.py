"""write_series: files readable by pydicom and dcmdump, with consistent geometry and UIDs."""

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from edge.phantom import generate_series, write_series

SIZE = 128
SLICES = 24


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    series = generate_series(21, "philips_c", size=SIZE, n_slices=SLICES, n_nodules=2, localizer=True)
    paths = write_series(series, out / "s")
    return series, paths


def _read(paths):
    datasets = [pydicom.dcmread(p) for p in paths]
    axial = [d for d in datasets if "LOCALIZER" not in d.ImageType]
    scouts = [d for d in datasets if "LOCALIZER" in d.ImageType]
    return axial, scouts


def test_files_are_ct_image_storage_with_file_meta(written):
    series, paths = written
    axial, scouts = _read(paths)
    assert len(axial) == SLICES and len(scouts) == 1
    for d in axial + scouts:
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.SOPClassUID == CTImageStorage == d.file_meta.MediaStorageSOPClassUID
        assert d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID
        for uid in (d.SOPInstanceUID, d.SeriesInstanceUID, d.StudyInstanceUID, d.FrameOfReferenceUID):
            assert UID(uid).is_valid
        assert d.SeriesInstanceUID == series.series_uid
        assert d.StudyInstanceUID == series.study_uid
        assert d.FrameOfReferenceUID == series.frame_of_reference_uid
        assert "PHANTOM" in str(d.PatientName) and d.PatientID.startswith("PHANTOM")
    assert len({d.SOPInstanceUID for d in axial + scouts}) == SLICES + 1
    assert [int(d.InstanceNumber) for d in axial] == list(range(1, SLICES + 1))


def test_geometry_steps_along_the_normal_by_the_slice_spacing(written):
    series, paths = written
    axial, _ = _read(paths)
    acq = series.acquisition
    normal = np.cross(np.array(axial[0].ImageOrientationPatient[:3], float),
                      np.array(axial[0].ImageOrientationPatient[3:], float))
    pos = np.array([np.array(d.ImagePositionPatient, float) @ normal for d in axial])
    steps = np.diff(np.sort(pos))
    np.testing.assert_allclose(steps, acq.slice_spacing, atol=1e-3)
    for d in axial:
        assert float(d.SliceThickness) == pytest.approx(acq.slice_thickness)
        assert float(d.SliceLocation) == pytest.approx(np.array(d.ImagePositionPatient, float) @ normal, abs=1e-3)
        assert [float(v) for v in d.PixelSpacing] == pytest.approx([acq.pixel_spacing] * 2, abs=1e-5)
        assert (d.Rows, d.Columns) == (SIZE, SIZE)
    # instance order follows the profile (philips_c: feet first, z ascending)
    assert np.all(np.diff(pos) > 0) != series.profile.head_first


def test_pixels_and_rescale_round_trip(written):
    series, paths = written
    axial, _ = _read(paths)
    for i, d in enumerate(axial):
        assert d.PixelRepresentation == (1 if series.profile.signed else 0)
        assert float(d.RescaleIntercept) == series.rescale_intercept
        assert float(d.RescaleSlope) == 1.0
        np.testing.assert_array_equal(d.pixel_array, series.pixels[i])
    if series.padding is not None:
        assert axial[0].PixelPaddingValue == series.padding[0]


def test_annotation_centres_lie_inside_the_written_volume(written):
    series, paths = written
    axial, _ = _read(paths)
    z = sorted(float(d.ImagePositionPatient[2]) for d in axial)
    d0 = axial[0]
    x0, y0 = float(d0.ImagePositionPatient[0]), float(d0.ImagePositionPatient[1])
    ps = float(d0.PixelSpacing[0])
    for n in series.nodules:
        col = (n.center[0] - x0) / ps
        row = (n.center[1] - y0) / ps
        assert 0 <= col < SIZE and 0 <= row < SIZE
        assert z[0] - 2 <= n.center[2] <= z[-1] + 2


def test_localizer_is_marked_and_coronal(written):
    _, paths = written
    _, scouts = _read(paths)
    scout = scouts[0]
    assert list(scout.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in scout.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump is not installed")
def test_dcmdump_reads_written_files(written):
    _, paths = written
    for p in (paths[0], paths[-1]):
        r = subprocess.run(["dcmdump", str(p)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "CTImageStorage" in r.stdout
        assert "E:" not in r.stderr
