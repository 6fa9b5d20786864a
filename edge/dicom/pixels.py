"""Stored pixel values: pixel data bytes -> (frames, rows, columns) int16 / uint16.

Native (uncompressed) pixel data is decoded here with NumPy, so the byte count,
the byte order and the bit layout are checked by this project, not left to a
decoder's version-dependent leniency. Compressed pixel data is decoded by
pydicom's decoder plugins (RLE built in; JPEG, JPEG-LS, JPEG 2000 need pillow,
pylibjpeg, pyjpegls or gdcm) and then goes through the same bit handling.

Bit handling: values are taken from bits ``HighBit - BitsStored + 1 .. HighBit``
(bits above are masked, whatever garbage they hold, e.g. overlays) and
sign-extended when PixelRepresentation is 1. Pixels equal to a padding value
that lies outside the BitsStored range are matched on the full stored word
before masking and keep that value, so padding never turns into tissue.
"""

from typing import Optional, Tuple

import numpy as np
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edge.dicom.pixel_format import PixelFormat
from edge.dicom.values import describe, element_value, exception_text
from edge.errors import DicomError, UnsupportedTransferSyntaxError


def resolve_transfer_syntax(ds, source: Optional[str]) -> Tuple[UID, Tuple[str, ...]]:
    """The transfer syntax of the pixel data, and a note when it had to be inferred."""
    meta = getattr(ds, "file_meta", None)
    value = element_value(meta, "TransferSyntaxUID", source) if meta is not None else None
    if value is not None:
        uid = UID(str(value).strip(" \x00"))
        if not uid.is_transfer_syntax:
            raise UnsupportedTransferSyntaxError(source, f"transfer syntax {uid} is not a known DICOM transfer syntax")
        return uid, ()
    implicit, little = _original_encoding(ds)
    if implicit is None or little is None:
        raise DicomError(
            source,
            "no TransferSyntaxUID in the file meta information and the dataset's encoding is unknown "
            "(a dataset built in memory needs file_meta.TransferSyntaxUID)",
        )
    if not little:
        uid = ExplicitVRBigEndian
    else:
        uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return uid, (f"no TransferSyntaxUID; pixel data read as {uid.name}, the encoding of the dataset itself",)


def decode_stored_frames(ds, fmt: PixelFormat, transfer_syntax: UID, source: Optional[str]) -> np.ndarray:
    """All frames' stored values, shape (frames, rows, columns), dtype int16 or uint16."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomError(source, "float pixel data is not supported for CT (integer PixelData expected)")
        raise DicomError(source, "no PixelData (7FE0,0010): not an image, or the file is truncated")
    if transfer_syntax.is_encapsulated:
        words = _decode_encapsulated(ds, fmt, transfer_syntax, source)
        shift = 0  # decoders return values in the low bits
    else:
        words = _decode_native(ds, fmt, transfer_syntax, source)
        shift = fmt.high_bit + 1 - fmt.bits_stored
    return _stored_values(words, fmt, shift, source)


def decoder_status(transfer_syntax: UID) -> Tuple[bool, str]:
    """(whether a decoder plugin for ``transfer_syntax`` is installed, what to install otherwise)."""
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2.x: pixel data handlers
        import pydicom.config

        handlers = [h for h in pydicom.config.pixel_data_handlers if h.supports_transfer_syntax(transfer_syntax)]
        missing = [getattr(h, "HANDLER_NAME", h.__name__) for h in handlers if not h.is_available()]
        return any(h.is_available() for h in handlers), ", ".join(missing)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return False, ""
    if decoder.is_available:
        return True, ""
    return False, "; ".join(decoder.missing_dependencies)


def _decode_native(ds, fmt: PixelFormat, transfer_syntax: UID, source: Optional[str]) -> np.ndarray:
    """Unsigned words of every pixel, native byte order, as a writable (frames, rows, cols) array."""
    try:
        element = ds["PixelData"]
        undefined_length = bool(getattr(element, "is_undefined_length", False))
        data = element.value
    except Exception as exc:  # a malformed element fails on access
        raise DicomError(source, f"cannot read {describe('PixelData')}: {exception_text(exc)}") from exc
    if undefined_length:
        raise DicomError(
            source, f"PixelData is encapsulated (compressed) but the transfer syntax {transfer_syntax.name} is not"
        )
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DicomError(source, f"PixelData holds {type(data).__name__}, not bytes")
    word_bytes = fmt.bits_allocated // 8
    expected = fmt.n_frames * fmt.rows * fmt.columns * word_bytes
    layout = f"{fmt.n_frames} frame(s) of {fmt.rows} x {fmt.columns} x {fmt.bits_allocated} bits"
    if len(data) < expected:
        raise DicomError(source, f"PixelData has {len(data)} bytes, {expected} needed for {layout} (truncated file?)")
    if len(data) > expected + 1:  # one byte pads an odd length to even
        raise DicomError(
            source,
            f"PixelData has {len(data)} bytes, {expected} expected for {layout} "
            "(wrong Rows, Columns, NumberOfFrames or BitsAllocated?)",
        )
    order = "<" if transfer_syntax.is_little_endian else ">"
    words = np.frombuffer(data, dtype=f"{order}u{word_bytes}", count=expected // word_bytes)
    return words.astype(f"=u{word_bytes}").reshape(fmt.n_frames, fmt.rows, fmt.columns)


def _decode_encapsulated(ds, fmt: PixelFormat, transfer_syntax: UID, source: Optional[str]) -> np.ndarray:
    """Unsigned words of every pixel from a pydicom decoder plugin, as a writable (frames, rows, cols) array."""
    available, missing = decoder_status(transfer_syntax)
    if not available:
        hint = f"; install one of: {missing}" if missing else ""
        raise UnsupportedTransferSyntaxError(
            source,
            f"pixel data is compressed as {transfer_syntax.name} ({transfer_syntax}) "
            f"and no decoder for it is installed{hint}",
        )
    try:
        array = _pydicom_pixel_array(ds)
    except Exception as exc:  # decoder plugins raise anything from ValueError to RuntimeError
        raise DicomError(source, f"cannot decode {transfer_syntax.name} pixel data: {exception_text(exc)}") from exc
    expected = (fmt.n_frames, fmt.rows, fmt.columns)
    if array.ndim == 2 and fmt.n_frames == 1:
        array = array[np.newaxis]
    if array.shape != expected or array.dtype.kind not in "iu":
        raise DicomError(
            source,
            f"decoded {transfer_syntax.name} pixel data is {array.dtype} {array.shape}, expected integer {expected}",
        )
    words = array.view(f"=u{array.dtype.itemsize}")
    return words if words.flags.writeable and words.flags.c_contiguous else np.array(words, order="C")


def _pydicom_pixel_array(ds) -> np.ndarray:
    try:
        from pydicom.pixels import pixel_array  # pydicom >= 3, does not cache on the dataset
    except ImportError:
        return ds.pixel_array
    return pixel_array(ds, raw=True)


def _stored_values(words: np.ndarray, fmt: PixelFormat, shift: int, source: Optional[str]) -> np.ndarray:
    """Mask, sign-extend and narrow unsigned words to int16 / uint16 stored values; modifies ``words``."""
    word_signed = words.view(f"=i{words.dtype.itemsize}")
    as_stored_word = word_signed if fmt.signed else words
    padded, padded_values = None, None
    if fmt.padding is not None and not fmt.padding_in_stored_range:
        low, high = fmt.padding
        padded = (as_stored_word >= low) & (as_stored_word <= high)
        padded_values = as_stored_word[padded]

    _normalize_bits(words, fmt.bits_stored, shift, fmt.signed)
    values = word_signed if fmt.signed else words
    if padded is not None:
        values[padded] = padded_values
    return _narrow_to_16_bits(values, fmt, source)


def _normalize_bits(words: np.ndarray, bits_stored: int, shift: int, signed: bool) -> None:
    """In place: keep bits ``shift .. shift + bits_stored - 1``, then sign-extend if ``signed``."""
    width = words.dtype.itemsize * 8
    if shift:
        words >>= words.dtype.type(shift)
    if bits_stored >= width:
        return
    words &= words.dtype.type((1 << bits_stored) - 1)
    if signed:
        # (v ^ s) - s, modulo 2**width, is v sign-extended from bit bits_stored - 1.
        sign = words.dtype.type(1 << (bits_stored - 1))
        words ^= sign
        words -= sign


def _narrow_to_16_bits(values: np.ndarray, fmt: PixelFormat, source: Optional[str]) -> np.ndarray:
    """8-bit values widen losslessly; 32-bit values must fit int16 or uint16."""
    if values.dtype.itemsize == 2:
        return values
    if values.dtype.itemsize == 1:
        return values.astype(np.int16 if fmt.signed else np.uint16)
    low, high = int(values.min()), int(values.max())
    if fmt.padding is not None:
        low, high = min(low, fmt.padding[0]), max(high, fmt.padding[1])
    for dtype in ((np.int16, np.uint16) if fmt.signed else (np.uint16, np.int16)):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return values.astype(dtype)
    raise DicomError(
        source, f"{fmt.bits_allocated}-bit stored values span {low} .. {high}, which does not fit 16 bits"
    )


def _original_encoding(ds) -> Tuple[Optional[bool], Optional[bool]]:
    """(implicit VR, little endian) the dataset was read with; (None, None) when built in memory."""
    encoding = getattr(ds, "original_encoding", None)  # pydicom >= 3
    if encoding is not None:
        return encoding
    return getattr(ds, "read_implicit_vr", None), getattr(ds, "read_little_endian", None)  # pydicom 2.x
