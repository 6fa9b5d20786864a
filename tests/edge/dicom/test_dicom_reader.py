"""edge.dicom.reader on small synthetic CT datasets written by the test."""

import io
import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from edge.dicom import read_frame, read_frames, read_header
from edge.dicom.pixels import decoder_status
from edge.errors import DicomError, UnsupportedTransferSyntaxError

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-778899"
SPACING = (0.7, 0.8)
POSITION = (-100.0, -120.5, 55.25)


def ct_dataset(stored, *, signed=True, bits_allocated=16, bits_stored=None, pixel_bytes=None, **attributes):
    """A minimal single-frame CT Image Storage dataset; attributes set to None are removed."""
    stored = np.asarray(stored)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = 7
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelSpacing = list(SPACING)
    ds.ImagePositionPatient = list(POSITION)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1.25
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    if pixel_bytes is None:
        kind = "i" if signed else "u"
        pixel_bytes = stored.astype(f"<{kind}{bits_allocated // 8}").tobytes()
    ds.PixelData = pixel_bytes
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def write(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def expected_hu(stored, slope, intercept):
    return np.asarray(stored, np.float64) * slope + intercept


def test_signed_storage_decodes_to_int16_with_hu(tmp_path):
    stored = np.array([[-2000, -1024, 0], [40, 1000, 3071]], np.int16)
    path = write(ct_dataset(stored, RescaleSlope=1.5, RescaleIntercept=-1000), tmp_path / "signed.dcm")

    frame = read_frame(path)

    assert frame.pixels.dtype == np.int16 and frame.pixels.shape == stored.shape
    np.testing.assert_array_equal(frame.pixels, stored)
    np.testing.assert_allclose(frame.hu(), expected_hu(stored, 1.5, -1000))
    assert frame.source == path and frame.notes == ()


def test_unsigned_values_above_32767_stay_uint16(tmp_path):
    stored = np.array([[0, 1024, 32767], [32768, 40000, 65535]], np.uint16)
    path = write(ct_dataset(stored, signed=False, RescaleIntercept=-32768), tmp_path / "unsigned.dcm")

    frame = read_frame(path)

    assert frame.pixels.dtype == np.uint16
    np.testing.assert_array_equal(frame.pixels, stored)
    np.testing.assert_array_equal(frame.hu(), expected_hu(stored, 1.0, -32768.0))


def test_padding_is_masked_before_rescale(tmp_path):
    stored = np.full((4, 5), 1024, np.int16)  # 0 HU
    stored[0, :] = -2000
    stored[1, 0] = -1990
    stored[3, 4] = -1024  # air, not padding
    ds = ct_dataset(stored, PixelPaddingValue=-2000, PixelPaddingRangeLimit=-1990)
    frame = read_frame(write(ds, tmp_path / "pad.dcm"))

    assert frame.padding == (-2000, -1990)
    expected_mask = (stored >= -2000) & (stored <= -1990)
    np.testing.assert_array_equal(frame.padding_mask, expected_mask)
    hu = frame.hu(fill_hu=-3333.0)
    assert np.all(hu[expected_mask] == -3333.0)
    np.testing.assert_array_equal(hu[~expected_mask], expected_hu(stored[~expected_mask], 1, -1024))


def test_padding_value_written_with_other_signedness_keeps_its_bit_pattern(tmp_path):
    stored = np.array([[-2000, 0], [100, -2000]], np.int16)
    ds = ct_dataset(stored)
    ds.add_new("PixelPaddingValue", "US", 63536)  # -2000 as an unsigned 16-bit word
    frame = read_frame(write(ds, tmp_path / "pad_us.dcm"))

    assert frame.padding == (-2000, -2000)
    np.testing.assert_array_equal(frame.padding_mask, stored == -2000)
    assert any("63536" in note for note in frame.notes)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_12_ignores_garbage_high_bits(tmp_path, signed):
    rng = np.random.default_rng(0)
    low, high = (-2048, 2047) if signed else (0, 4095)
    values = rng.integers(low, high + 1, size=(6, 7))
    values[0, :2] = low, high
    garbage = rng.integers(1, 16, size=values.shape) << 12  # bits 12..15 never zero
    words = ((values & 0x0FFF) | garbage).astype("<u2")
    ds = ct_dataset(values, signed=signed, bits_stored=12, pixel_bytes=words.tobytes())
    frame = read_frame(write(ds, tmp_path / "bits12.dcm"))

    assert frame.pixels.dtype == (np.int16 if signed else np.uint16)
    np.testing.assert_array_equal(frame.pixels, values)


def test_high_bit_above_bits_stored_minus_one_shifts_values_down(tmp_path):
    values = np.array([[0, 1, 2047], [4095, 1234, 17]])
    words = ((values << 4) | 0x000F).astype("<u2")  # values in bits 4..15, garbage in bits 0..3
    ds = ct_dataset(values, signed=False, bits_stored=12, pixel_bytes=words.tobytes(), HighBit=15)
    np.testing.assert_array_equal(read_frame(write(ds, tmp_path / "hb15.dcm")).pixels, values)


def test_padding_outside_bits_stored_range_is_matched_on_the_whole_word(tmp_path):
    pad = 0xF830  # > 4095: cannot be a 12-bit value; masked, it would read 2096 (bone)
    values = np.array([[100, 200, 300], [400, 500, 600]])
    words = values.astype("<u2") | np.uint16(0x3000)  # garbage above bit 11 on tissue pixels
    words[0, 0] = words[1, 2] = pad
    ds = ct_dataset(values, signed=False, bits_stored=12, pixel_bytes=words.tobytes(), PixelPaddingValue=pad)
    frame = read_frame(write(ds, tmp_path / "pad12.dcm"))

    mask = np.zeros(values.shape, bool)
    mask[0, 0] = mask[1, 2] = True
    np.testing.assert_array_equal(frame.padding_mask, mask)
    np.testing.assert_array_equal(frame.pixels[~mask], values[~mask])
    assert np.all(frame.hu(fill_hu=-5000.0)[mask] == -5000.0)


def test_monochrome1_is_recorded_and_does_not_change_hu(tmp_path):
    stored = np.array([[-1024, 0], [500, 2000]], np.int16)
    mono2 = read_frame(write(ct_dataset(stored), tmp_path / "m2.dcm"))
    mono1 = read_frame(write(ct_dataset(stored, PhotometricInterpretation="MONOCHROME1"), tmp_path / "m1.dcm"))

    assert mono1.photometric == "MONOCHROME1" and mono2.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(mono1.pixels, stored)
    np.testing.assert_array_equal(mono1.hu(), mono2.hu())


def test_missing_rescale_defaults_with_note_and_warning_without_patient_data(tmp_path, caplog):
    stored = np.array([[0, 1000]], np.int16)
    path = write(ct_dataset(stored, RescaleSlope=None, RescaleIntercept=None), tmp_path / "norescale.dcm")

    with caplog.at_level(logging.WARNING, logger="edge.dicom"):
        frame = read_frame(path)

    assert (frame.rescale_slope, frame.rescale_intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(frame.hu(), stored.astype(np.float32))
    assert any("RescaleSlope" in n for n in frame.notes) and any("RescaleIntercept" in n for n in frame.notes)
    assert path in caplog.text and "RescaleIntercept" in caplog.text
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


def test_localizer_is_kept_and_flagged(tmp_path):
    ds = ct_dataset(np.zeros((3, 3), np.int16), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    path = write(ds, tmp_path / "scout.dcm")
    assert read_frame(path).is_localizer is True
    assert read_header(path).is_localizer is True
    assert read_frame(write(ct_dataset(np.zeros((3, 3), np.int16)), tmp_path / "axial.dcm")).is_localizer is False


def enhanced_ct_dataset(volume):
    """Three-frame Enhanced CT: shared measures/orientation/rescale, per-frame positions, frame 2 own rescale."""
    ds = ct_dataset(volume.reshape(-1, volume.shape[-1]), NumberOfFrames=len(volume))
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.PixelData = volume.astype("<i2").tobytes()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)

    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = list(SPACING)
    shared.PixelMeasuresSequence[0].SliceThickness = 2.0
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelValueTransformationSequence = [Dataset()]
    transform = shared.PixelValueTransformationSequence[0]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    for index in range(len(volume)):
        group = Dataset()
        group.PlanePositionSequence = [Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = [POSITION[0], POSITION[1], POSITION[2] + 2.0 * index]
        group.CTImageFrameTypeSequence = [Dataset()]
        group.CTImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        per_frame.append(group)
    per_frame[2].PixelValueTransformationSequence = [Dataset()]
    own = per_frame[2].PixelValueTransformationSequence[0]
    own.RescaleSlope, own.RescaleIntercept, own.RescaleType = 2, -2048, "HU"
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


def test_enhanced_ct_multiframe_uses_per_frame_then_shared_groups(tmp_path):
    volume = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) * 10 - 200
    path = write(enhanced_ct_dataset(volume), tmp_path / "enhanced.dcm")

    frames = read_frames(path)

    assert [f.frame_index for f in frames] == [0, 1, 2]
    expected_positions = [(POSITION[0], POSITION[1], POSITION[2] + 2.0 * i) for i in range(3)]
    assert [f.geometry.position for f in frames] == expected_positions
    assert len({f.sop_uid for f in frames}) == 1
    for index, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.pixels, volume[index])
        assert frame.geometry.pixel_spacing == SPACING and frame.geometry.slice_thickness == 2.0
        assert frame.geometry.row_direction == (1.0, 0.0, 0.0)
    assert [(f.rescale_slope, f.rescale_intercept) for f in frames] == [(1, -1024), (1, -1024), (2, -2048)]
    np.testing.assert_allclose(frames[2].hu(), expected_hu(volume[2], 2, -2048))
    with pytest.raises(DicomError, match="expected one frame"):
        read_frame(path)
    header = read_header(path)
    assert header.n_frames == 3 and header.slice_location == pytest.approx(POSITION[2])


def test_enhanced_ct_frame_type_localizer_and_missing_frame_position(tmp_path):
    volume = np.zeros((3, 2, 2), np.int16)
    ds = enhanced_ct_dataset(volume)
    frame_type = ds.PerFrameFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0]
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    frames = read_frames(write(ds, tmp_path / "loc.dcm"))
    assert [f.is_localizer for f in frames] == [True, False, False]

    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    path = write(ds, tmp_path / "nopos.dcm")
    with pytest.raises(DicomError, match=r"frame 1: missing ImagePositionPatient") as error:
        read_frames(path)
    assert path in str(error.value)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_rejected_naming_file_and_attribute(tmp_path, keyword):
    path = write(ct_dataset(np.zeros((2, 2), np.int16), **{keyword: None}), tmp_path / "nogeo.dcm")
    with pytest.raises(DicomError) as error:
        read_frames(path)
    assert str(error.value).startswith(path) and f"missing {keyword}" in str(error.value)


def test_skewed_orientation_is_rejected(tmp_path):
    ds = ct_dataset(np.zeros((2, 2), np.int16), ImageOrientationPatient=[1, 0, 0, 0.5, 1, 0])
    path = write(ds, tmp_path / "skew.dcm")
    with pytest.raises(DicomError, match="orthogonal unit vectors"):
        read_frames(path)


def test_dataset_and_stream_inputs_match_the_file(tmp_path):
    stored = np.array([[1, -2], [300, -400]], np.int16)
    ds = ct_dataset(stored)
    path = write(ds, tmp_path / "a.dcm")
    from_file = read_frame(path)

    from_dataset = read_frame(ds)
    with open(path, "rb") as stream:
        from_stream = read_frame(io.BytesIO(stream.read()))

    for frame in (from_dataset, from_stream):
        np.testing.assert_array_equal(frame.pixels, from_file.pixels)
        assert frame.geometry == from_file.geometry and frame.sop_uid == from_file.sop_uid
    assert from_dataset.source is None


def test_dataset_built_in_memory_without_transfer_syntax_is_rejected():
    ds = ct_dataset(np.zeros((2, 2), np.int16))
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DicomError, match="TransferSyntaxUID") as error:
        read_frames(ds)
    assert str(error.value).startswith("<memory>:")


def test_file_without_meta_header_is_read_bare_with_a_note(tmp_path):
    stored = np.array([[5, -6], [700, -800]], np.int16)
    ds = ct_dataset(stored)
    del ds.file_meta
    path = str(tmp_path / "nometa.dcm")
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)

    frame = read_frame(path)

    np.testing.assert_array_equal(frame.pixels, stored)
    assert any("no DICOM file meta header" in n for n in frame.notes)
    assert any("Implicit VR Little Endian" in n for n in frame.notes)


def test_eight_bit_storage_widens_losslessly(tmp_path):
    stored = np.array([[0, 17], [128, 255]], np.uint8)
    ds = ct_dataset(stored, signed=False, bits_allocated=8)
    frame = read_frame(write(ds, tmp_path / "u8.dcm"))
    assert frame.pixels.dtype == np.uint16
    np.testing.assert_array_equal(frame.pixels, stored)


def test_thirty_two_bit_storage_narrows_when_it_fits_and_is_rejected_otherwise(tmp_path):
    fits = np.array([[-1024, 0], [3000, -2000]], np.int32)
    frame = read_frame(write(ct_dataset(fits, bits_allocated=32), tmp_path / "i32.dcm"))
    assert frame.pixels.dtype == np.int16
    np.testing.assert_array_equal(frame.pixels, fits)

    too_wide = np.array([[0, 70000]], np.uint32)
    path = write(ct_dataset(too_wide, signed=False, bits_allocated=32), tmp_path / "u32.dcm")
    with pytest.raises(DicomError, match="does not fit 16 bits"):
        read_frames(path)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"Modality": "MR", "SOPClassUID": MRImageStorage}, "modality MR is not CT"),
        ({"SOPClassUID": SecondaryCaptureImageStorage}, "Secondary Capture Image Storage"),
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "PhotometricInterpretation RGB"),
        ({"Rows": 3}, "PixelData has 8 bytes, 12 needed"),
        ({"Columns": 1}, "wrong Rows, Columns"),
        ({"SeriesInstanceUID": None}, "missing SeriesInstanceUID"),
        ({"PixelRepresentation": None}, "missing PixelRepresentation"),
        ({"RescaleSlope": 0}, "RescaleSlope is 0"),
        ({"PixelData": None}, "no PixelData"),
    ],
)
def test_unusable_files_are_rejected_with_the_reason(tmp_path, changes, reason):
    path = write(ct_dataset(np.zeros((2, 2), np.int16), **changes), tmp_path / "bad.dcm")
    with pytest.raises(DicomError) as error:
        read_frames(path)
    assert str(error.value).startswith(path + ":") and reason in str(error.value)


def test_missing_modality_is_accepted_from_the_ct_sop_class(tmp_path):
    frame = read_frame(write(ct_dataset(np.zeros((2, 2), np.int16), Modality=None), tmp_path / "nomod.dcm"))
    assert any("Modality missing" in n for n in frame.notes)
    header = read_header(frame.source)
    assert header.modality == "" and header.is_ct


def test_stop_before_pixels_fills_everything_but_pixels(tmp_path):
    path = write(ct_dataset(np.zeros((3, 4), np.uint16), signed=False, PixelPaddingValue=0), tmp_path / "h.dcm")
    (frame,) = read_frames(path, stop_before_pixels=True)
    assert frame.pixels.shape == (0, 0) and frame.pixels.dtype == np.uint16
    assert (frame.geometry.rows, frame.geometry.columns) == (3, 4)
    assert frame.geometry.position == POSITION and frame.padding == (0, 0)


def test_compressed_syntax_without_decoder_is_unsupported(tmp_path):
    ds = ct_dataset(np.zeros((2, 2), np.int16))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = write(ds, tmp_path / "jpegll.dcm")
    available, _ = decoder_status(JPEGLosslessSV1)
    expected = DicomError if available else UnsupportedTransferSyntaxError
    with pytest.raises(expected) as error:
        read_frames(path)
    assert str(error.value).startswith(path + ":") and "JPEG Lossless" in str(error.value)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_other_native_transfer_syntaxes_decode_the_same_values(tmp_path, syntax):
    stored = np.array([[-1024, 3], [2000, -2000]], np.int16)
    ds = ct_dataset(stored)
    ds.file_meta.TransferSyntaxUID = syntax
    path = write(ds, tmp_path / "syntax.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_frame(path).pixels, stored)


def test_unknown_transfer_syntax_is_unsupported(tmp_path):
    ds = ct_dataset(np.zeros((2, 2), np.int16))
    path = write(ds, tmp_path / "private_ts.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    with pytest.raises(UnsupportedTransferSyntaxError, match="1.2.3.4.5"):
        read_frames(ds)
