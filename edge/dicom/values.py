"""Typed access to DICOM attributes; every failure names the attribute and the problem.

pydicom converts element values lazily, so a malformed element only fails when
it is read. These helpers turn such failures, and values of the wrong kind or
count, into :class:`~edge.errors.DicomError` for the file being read.
"""

import math
from collections import abc
from functools import lru_cache
from typing import Optional, Tuple

from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from edge.errors import DicomError


def describe(keyword: str) -> str:
    """``Keyword (gggg,eeee)`` for messages."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return keyword
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


@lru_cache(maxsize=None)
def _tag(keyword: str):
    """The tag of a DICOM keyword (pydicom's keyword lookup costs ~6x the element access), else the keyword."""
    tag = tag_for_keyword(keyword)
    return keyword if tag is None else Tag(tag)


def element_value(ds, keyword: str, source: Optional[str]):
    """The value of ``keyword`` in ``ds``, or None when absent or empty."""
    tag = _tag(keyword)
    try:
        if tag not in ds:
            return None
        value = ds[tag].value
    except Exception as exc:  # pydicom raises many types for one malformed element
        raise DicomError(source, f"cannot read {describe(keyword)}: {exception_text(exc)}") from exc
    if value is None:
        return None
    if isinstance(value, str) and not value.strip(" \x00"):
        return None
    if (isinstance(value, (bytes, bytearray)) or _is_multi(value)) and len(value) == 0:
        return None
    return value


def optional_str(ds, keyword: str, source: Optional[str]) -> str:
    """A single string value, stripped; "" when absent."""
    value = element_value(ds, keyword, source)
    if value is None:
        return ""
    if not isinstance(value, str):
        if _is_multi(value):
            raise DicomError(source, f"{describe(keyword)} has {len(value)} values, expected 1")
        value = str(value)
    return value.strip(" \x00")


def string_tuple(ds, keyword: str, source: Optional[str]) -> Tuple[str, ...]:
    """All values of a multi-valued string attribute (e.g. ImageType); () when absent."""
    value = element_value(ds, keyword, source)
    if value is None:
        return ()
    values = list(value) if _is_multi(value) else [value]
    return tuple(str(v).strip(" \x00") for v in values)


def optional_int(ds, keyword: str, source: Optional[str]) -> Optional[int]:
    """A single integer value, or None when absent."""
    value = element_value(ds, keyword, source)
    if value is None:
        return None
    if _is_multi(value):
        raise DicomError(source, f"{describe(keyword)} has {len(value)} values, expected 1")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomError(source, f"{describe(keyword)} is not a number: {str(value)[:40]!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise DicomError(source, f"{describe(keyword)} is not an integer: {str(value)[:40]!r}")
    return int(number)


def required_int(ds, keyword: str, source: Optional[str], why: str = "") -> int:
    """A single integer value; DicomError when absent."""
    value = optional_int(ds, keyword, source)
    if value is None:
        raise DicomError(source, f"missing {describe(keyword)}{why}")
    return value


def optional_float(ds, keyword: str, source: Optional[str]) -> Optional[float]:
    """A single finite number, or None when absent."""
    value = element_value(ds, keyword, source)
    if value is None:
        return None
    if _is_multi(value):
        raise DicomError(source, f"{describe(keyword)} has {len(value)} values, expected 1")
    return _finite(value, keyword, source)


def float_tuple(ds, keyword: str, count: int, source: Optional[str]) -> Optional[Tuple[float, ...]]:
    """Exactly ``count`` finite numbers, or None when absent."""
    value = element_value(ds, keyword, source)
    if value is None:
        return None
    values = list(value) if _is_multi(value) else [value]
    if len(values) != count:
        raise DicomError(source, f"{describe(keyword)} has {len(values)} values, expected {count}")
    return tuple(_finite(v, keyword, source) for v in values)


def _finite(value, keyword: str, source: Optional[str]) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomError(source, f"{describe(keyword)} is not a number: {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise DicomError(source, f"{describe(keyword)} is not finite: {number}")
    return number


def _is_multi(value) -> bool:
    """True for MultiValue, Sequence and lists; False for str/bytes, which are sequences too."""
    return isinstance(value, abc.Sequence) and not isinstance(value, (str, bytes, bytearray))


def exception_text(exc: Exception, limit: int = 200) -> str:
    """One line of an exception message, for user-facing reasons."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
