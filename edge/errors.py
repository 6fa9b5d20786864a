"""The two kinds of failure: user-facing errors and internal bugs.

Anything raised as :class:`EdgeError` is the user's to fix (a bad file, a bad
option, a missing optional dependency). The CLI prints it as one line and exits
1. Any other exception is a bug in this project and keeps its traceback.
"""

import sys


class EdgeError(Exception):
    """A user-facing error: printed as one clear line, never with a traceback."""


def report_user_error(error: "EdgeError") -> int:
    """Print ``error`` the way every CLI here does (one line on stderr); returns their exit status, 1."""
    print(f"error: {error}", file=sys.stderr)
    return 1


class InputError(EdgeError):
    """A bad input file. The message always names the file and the reason."""

    def __init__(self, path, reason):
        self.path = str(path) if path is not None else "<memory>"
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")


class DicomError(InputError):
    """A file that is not a usable DICOM CT frame (unreadable, wrong modality, ...)."""


class UnsupportedTransferSyntaxError(DicomError):
    """Compressed pixel data for which no decoder plugin is installed."""


class ConfigError(EdgeError):
    """A bad setting: the message names the key."""


class MissingDependencyError(EdgeError):
    """An optional package (tensorrt, pycuda, ...) is needed for what was asked."""
