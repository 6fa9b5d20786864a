"""What the stored pixel values are: size, bit layout, signedness, photometric, padding.

Read from the Image Pixel module (and Pixel Padding attributes of the General
Equipment module) before any pixel data is decoded, so a file that cannot be a
CT image is rejected without decoding it.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from edge.dicom.values import describe, optional_int, optional_str, required_int
from edge.errors import DicomError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
SUPPORTED_BITS_ALLOCATED = (8, 16, 32)


@dataclass(frozen=True)
class PixelFormat:
    """The layout of one instance's stored pixel values.

    ``padding`` is the inclusive (low, high) range of PixelPaddingValue
    [.. PixelPaddingRangeLimit], as values of a ``bits_allocated``-wide word of
    the instance's signedness, or None.
    """

    rows: int
    columns: int
    n_frames: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    signed: bool
    photometric: str
    padding: Optional[Tuple[int, int]] = None
    notes: Tuple[str, ...] = ()

    @property
    def stored_range(self) -> Tuple[int, int]:
        """The inclusive range of values ``bits_stored`` bits can hold."""
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    @property
    def padding_in_stored_range(self) -> bool:
        """True when padding can be matched after masking to ``bits_stored`` bits."""
        if self.padding is None:
            return True
        low, high = self.stored_range
        return low <= self.padding[0] and self.padding[1] <= high

    @property
    def nominal_dtype(self) -> np.dtype:
        """The 16-bit dtype frames of this format decode to (32-bit data may pick the other one)."""
        return np.dtype(np.int16 if self.signed else np.uint16)


def read_pixel_format(ds, source: Optional[str]) -> PixelFormat:
    """Validate the Image Pixel attributes of a CT instance; DicomError naming the attribute otherwise."""
    notes = []
    photometric = optional_str(ds, "PhotometricInterpretation", source).upper()
    if not photometric:
        photometric = "MONOCHROME2"
        notes.append("PhotometricInterpretation missing; MONOCHROME2 assumed (affects display only)")
    if photometric not in MONOCHROME:
        raise DicomError(
            source, f"PhotometricInterpretation {photometric} is not supported: CT must be MONOCHROME1 or MONOCHROME2"
        )
    samples = optional_int(ds, "SamplesPerPixel", source)
    if samples is not None and samples != 1:
        raise DicomError(source, f"SamplesPerPixel is {samples}: a CT image has one sample per pixel")

    rows = required_int(ds, "Rows", source)
    columns = required_int(ds, "Columns", source)
    if rows < 1 or columns < 1:
        raise DicomError(source, f"image size {rows} x {columns} (Rows x Columns) is empty")
    n_frames = optional_int(ds, "NumberOfFrames", source)
    n_frames = 1 if n_frames is None else n_frames
    if n_frames < 1:
        raise DicomError(source, f"{describe('NumberOfFrames')} is {n_frames}")

    bits_allocated = required_int(ds, "BitsAllocated", source)
    if bits_allocated not in SUPPORTED_BITS_ALLOCATED:
        raise DicomError(
            source, f"BitsAllocated {bits_allocated} is not supported for CT (expected 8, 16 or 32)"
        )
    bits_stored = required_int(ds, "BitsStored", source)
    if not 1 <= bits_stored <= bits_allocated:
        raise DicomError(source, f"BitsStored {bits_stored} is not within 1..BitsAllocated ({bits_allocated})")
    high_bit = optional_int(ds, "HighBit", source)
    if high_bit is None:
        high_bit = bits_stored - 1
        notes.append(f"HighBit missing; {high_bit} (BitsStored - 1) assumed")
    if not bits_stored - 1 <= high_bit <= bits_allocated - 1:
        raise DicomError(
            source,
            f"HighBit {high_bit} is not within BitsStored - 1 ({bits_stored - 1}) .. BitsAllocated - 1 "
            f"({bits_allocated - 1})",
        )
    representation = required_int(ds, "PixelRepresentation", source)
    if representation not in (0, 1):
        raise DicomError(source, f"PixelRepresentation {representation} is neither 0 (unsigned) nor 1 (signed)")
    signed = representation == 1

    padding, padding_notes = _padding_range(ds, bits_allocated, signed, source)
    return PixelFormat(
        rows=rows,
        columns=columns,
        n_frames=n_frames,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        high_bit=high_bit,
        signed=signed,
        photometric=photometric,
        padding=padding,
        notes=tuple(notes) + padding_notes,
    )


def _padding_range(ds, bits_allocated: int, signed: bool, source: Optional[str]):
    """(low, high) of the padding values as stored words, and notes on any reinterpretation."""
    value = optional_int(ds, "PixelPaddingValue", source)
    limit = optional_int(ds, "PixelPaddingRangeLimit", source)
    if value is None:
        if limit is not None:
            return None, ("PixelPaddingRangeLimit without PixelPaddingValue; ignored",)
        return None, ()
    given = (value,) if limit is None else (value, limit)
    words = tuple(_as_word(v, bits_allocated, signed) for v in given)
    kind = f"{'signed' if signed else 'unsigned'} {bits_allocated}-bit"
    if any(w is None for w in words):
        # No stored word can equal a value outside every bits_allocated-bit pattern.
        if limit is None:
            return None, (f"PixelPaddingValue {value} cannot occur in {kind} pixels; ignored",)
        raise DicomError(
            source, f"PixelPaddingValue {value} / PixelPaddingRangeLimit {limit} do not fit {kind} pixels"
        )
    if words == given:
        return (min(words), max(words)), ()
    # A padding value written with the other signedness (US vs SS) than the
    # pixels: its bit pattern is what the scanner wrote into the padded pixels.
    if len(words) == 2 and (given[0] <= given[1]) != (words[0] <= words[1]):
        raise DicomError(
            source,
            f"PixelPaddingValue {value} / PixelPaddingRangeLimit {limit} change order when read as {kind} pixels",
        )
    note = f"padding {given} read as {words}, the same bit patterns as {kind} pixels"
    return (min(words), max(words)), (note,)


def _as_word(value: int, bits: int, signed: bool) -> Optional[int]:
    """``value`` as a ``bits``-wide word of the given signedness, or None when no such pattern exists."""
    if signed and -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
        return value
    if not signed and 0 <= value < (1 << bits):
        return value
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        return None
    pattern = value & ((1 << bits) - 1)
    if signed and pattern >> (bits - 1):
        return pattern - (1 << bits)
    return pattern
