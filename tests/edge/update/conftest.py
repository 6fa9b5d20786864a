"""Session fixtures for the update tests (helpers live in update_helpers.py)."""

import pytest

from update_helpers import export_tiny, make_golden_file


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Two tiny detectors that differ (seeds 0 and 1), each with golden vectors made from it."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        onnx = export_tiny(root / f"{name}.onnx", seed)
        out[name] = (onnx, make_golden_file(onnx, root / f"{name}.golden.npz"))
    return out


@pytest.fixture(scope="session")
def signing_key():
    pytest.importorskip("cryptography")
    from edge.update.signing import PrivateKey

    return PrivateKey.generate()
