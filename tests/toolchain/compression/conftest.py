"""Fixtures of the compression tests (helpers in compression_helpers.py)."""

import pytest
import torch

from compression_helpers import SIZE, make_sampler, synthetic_series, tiny_specs, tiny_teacher
from toolchain.compression.checkpoint import save_checkpoint
from toolchain.training.sampling import AugmentConfig, CropSampler


@pytest.fixture(autouse=True)
def one_thread():
    """Keep the shared CPU free: one torch thread inside these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sampler():
    return make_sampler(0)


@pytest.fixture
def val_sampler():
    return CropSampler([synthetic_series(7)], slices=3, stride=2, fill_value=0.0,
                       cfg=AugmentConfig(crop=SIZE, rotate_deg=0.0))


@pytest.fixture
def teacher_checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "teacher.pt", tiny_teacher().eval(), tiny_specs(), {"name": "tiny-teacher"})
