"""edge.dicom on every file pydicom ships for its own tests: decode correctly or raise DicomError."""

import os

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian

from edge.dicom import DicomHeader, read_frames, read_header
from edge.dicom.pixels import decoder_status
from edge.errors import DicomError, UnsupportedTransferSyntaxError
from edge.frame import CTFrame

TEST_FILES = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


def corpus_files():
    listed = {os.path.join(folder, name) for folder, _, names in os.walk(TEST_FILES) for name in names}
    return sorted(set(get_testdata_files()) | listed)


CORPUS = corpus_files()


def check_frames(frames, path):
    assert frames and all(isinstance(f, CTFrame) for f in frames)
    for index, frame in enumerate(frames):
        assert frame.pixels.ndim == 2 and frame.pixels.dtype in (np.int16, np.uint16)
        assert frame.pixels.shape == (frame.geometry.rows, frame.geometry.columns)
        assert np.isfinite(frame.rescale_slope) and frame.rescale_slope != 0 and np.isfinite(frame.rescale_intercept)
        assert frame.photometric in ("MONOCHROME1", "MONOCHROME2")
        assert frame.source == path and frame.frame_index == index and frame.sop_uid
        assert np.isfinite(frame.geometry.slice_location) and min(frame.geometry.pixel_spacing) > 0


def test_corpus_is_found():
    assert len(CORPUS) > 50 and os.path.join(TEST_FILES, "CT_small.dcm") in CORPUS


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the malformed files on purpose
@pytest.mark.parametrize("path", CORPUS, ids=lambda p: os.path.relpath(p, TEST_FILES))
def test_every_file_decodes_or_raises_dicom_error(path):
    try:
        frames = read_frames(path)
    except DicomError as error:
        assert str(error).startswith(f"{path}: ") and error.reason
    else:
        check_frames(frames, path)
    try:
        header = read_header(path)
    except DicomError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert isinstance(header, DicomHeader) and header.source == path and header.n_frames >= 1


def test_ct_small_hu_and_geometry_match_the_raw_tags():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    (frame,) = read_frames(path)

    # Independent of every decoder: the little-endian signed words as stored.
    assert ds.file_meta.TransferSyntaxUID.is_little_endian and ds.PixelRepresentation == 1 and ds.BitsStored == 16
    raw = np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns)
    hu = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(frame.pixels, raw)
    for row, col in [(0, 0), (64, 64), (100, 30), (127, 127)]:
        if raw[row, col] != ds.PixelPaddingValue:
            assert frame.hu()[row, col] == pytest.approx(hu[row, col])
    not_padding = raw != ds.PixelPaddingValue
    np.testing.assert_allclose(frame.hu()[not_padding], hu[not_padding])
    assert frame.padding == (int(ds.PixelPaddingValue),) * 2

    geometry = frame.geometry
    assert geometry.position == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    assert geometry.row_direction == pytest.approx([float(v) for v in ds.ImageOrientationPatient[:3]])
    assert geometry.column_direction == pytest.approx([float(v) for v in ds.ImageOrientationPatient[3:]])
    assert geometry.pixel_spacing == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert geometry.slice_thickness == pytest.approx(float(ds.SliceThickness))
    assert (geometry.rows, geometry.columns) == (ds.Rows, ds.Columns)
    assert (frame.study_uid, frame.series_uid, frame.sop_uid) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert frame.instance_number == int(ds.InstanceNumber) and not frame.is_localizer

    header = read_header(path)
    assert header.is_ct and header.series_key == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert header.slice_location == pytest.approx(geometry.slice_location)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"])
def test_mr_is_rejected_as_not_ct(name):
    path = get_testdata_file(name)
    with pytest.raises(DicomError, match="modality MR is not CT") as error:
        read_frames(path)
    assert str(error.value).startswith(path)


def test_rgb_files_are_rejected(tmp_path):
    with pytest.raises(DicomError):
        read_frames(get_testdata_file("SC_rgb_small_odd.dcm"))
    # The same RGB pixels labelled as CT are refused for their photometric interpretation.
    ds = pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm"))
    ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
    path = str(tmp_path / "rgb_ct.dcm")
    ds.save_as(path)
    with pytest.raises(DicomError, match="PhotometricInterpretation RGB"):
        read_frames(path)


def test_jpeg2000_ct_without_decoder_is_unsupported_else_decoded():
    path = get_testdata_file("693_J2KI.dcm")
    ds = pydicom.dcmread(path)
    available, _ = decoder_status(ds.file_meta.TransferSyntaxUID)
    if not available:
        with pytest.raises(UnsupportedTransferSyntaxError, match="JPEG 2000") as error:
            read_frames(path)
        assert str(error.value).startswith(path)
        pytest.skip("no JPEG 2000 decoder installed: checked the rejection only")
    (frame,) = read_frames(path)
    np.testing.assert_array_equal(frame.pixels, ds.pixel_array)
    lo, hi = -(1 << (ds.BitsStored - 1)), (1 << (ds.BitsStored - 1)) - 1
    assert lo <= frame.pixels.min() and frame.pixels.max() <= hi


def test_jpeg2000_rejection_names_the_syntax_when_no_plugin(monkeypatch):
    monkeypatch.setattr("edge.dicom.pixels.decoder_status", lambda uid: (False, "pylibjpeg-openjpeg"))
    path = get_testdata_file("693_J2KI.dcm")
    with pytest.raises(UnsupportedTransferSyntaxError) as error:
        read_frames(path)
    message = str(error.value)
    assert message.startswith(path) and "JPEG 2000" in message and "pylibjpeg-openjpeg" in message


def test_big_endian_ct_matches_little_endian(tmp_path):
    little_path = get_testdata_file("CT_small.dcm")
    source = pydicom.dcmread(little_path)
    source.remove_private_tags()
    stored = np.frombuffer(source.PixelData, "<i2").reshape(source.Rows, source.Columns)
    ds = pydicom.Dataset(source)  # a copy with no "read as little endian" history
    ds.file_meta = pydicom.dataset.FileMetaDataset(source.file_meta)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = stored.astype(">i2").tobytes()  # OW is written as given: swap here
    big_path = str(tmp_path / "ct_big_endian.dcm")
    pydicom.dcmwrite(big_path, ds, enforce_file_format=True)

    (little,) = read_frames(little_path)
    (big,) = read_frames(big_path)

    assert pydicom.dcmread(big_path).original_encoding == (False, False)
    np.testing.assert_array_equal(big.pixels, little.pixels)
    np.testing.assert_array_equal(big.pixels, pydicom.dcmread(big_path).pixel_array)
    assert big.geometry == little.geometry and big.padding == little.padding
    assert (big.rescale_slope, big.rescale_intercept) == (little.rescale_slope, little.rescale_intercept)
    # MR big-endian is refused for the same reason as its little-endian twin.
    for name in ("MR_small.dcm", "MR_small_bigendian.dcm"):
        with pytest.raises(DicomError, match="modality MR is not CT"):
            read_frames(get_testdata_file(name))


@pytest.mark.parametrize("keep", [64, 140, 1000, 6296, 6400, 20000, 39000])
def test_truncated_ct_small_raises_dicom_error_naming_the_file(tmp_path, keep):
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    assert keep < len(data) - 126  # every cut is before the end of the pixel data
    path = str(tmp_path / f"ct_small_cut_{keep}.dcm")
    with open(path, "wb") as out:
        out.write(data[:keep])
    with pytest.raises(DicomError) as error:
        read_frames(path)
    assert str(error.value).startswith(path + ":")


def test_rle_compressed_ct_small_matches_the_native_file(tmp_path):
    from pydicom.uid import RLELossless

    native_path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(native_path)
    ds.compress(RLELossless)  # pydicom's own RLE encoder, no plugin needed
    rle_path = str(tmp_path / "ct_small_rle.dcm")
    ds.save_as(rle_path)

    (native,) = read_frames(native_path)
    (rle,) = read_frames(rle_path)

    assert pydicom.dcmread(rle_path).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(rle.pixels, native.pixels)
    assert rle.pixels.dtype == native.pixels.dtype and rle.geometry == native.geometry
