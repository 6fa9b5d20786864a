"""Findings out: JSON Lines, overlay PNGs and DICOM structured reports of committed series results."""
