"""DICOM CT ingest: one file, stream or received Dataset -> decoded :class:`~edge.frame.CTFrame` objects."""

from edge.dicom.reader import DicomHeader, read_frame, read_frames, read_header

__all__ = ["DicomHeader", "read_frame", "read_frames", "read_header"]
