"""Fixtures shared by the ingest tests (helpers live in ingest_helpers.py)."""

from pathlib import Path

import pytest
from ingest_helpers import build_blob_model

from edge.backends.onnxruntime_runner import OnnxRuntimeRunner


@pytest.fixture(scope="session")
def blob_model(tmp_path_factory) -> Path:
    return build_blob_model(tmp_path_factory.mktemp("model") / "blob.onnx")


@pytest.fixture()
def blob_runner(blob_model):
    runner = OnnxRuntimeRunner(blob_model, intra_op_threads=1).activate()
    yield runner
    runner.deactivate()
