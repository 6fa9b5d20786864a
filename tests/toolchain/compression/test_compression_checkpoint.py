import os

import pytest
import torch

from edge.errors import InputError
from toolchain.compression.checkpoint import write_checkpoint


def test_missing_folders_are_made_and_no_staging_file_is_left(tmp_path):
    path = write_checkpoint({"step": 3}, tmp_path / "new" / "deeper" / "last.pt")
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert os.listdir(path.parent) == ["last.pt"]


@pytest.mark.skipif(os.name != "posix", reason="a file in place of the folder is how the failure is made")
def test_an_unwritable_destination_is_an_input_error_naming_it(tmp_path):
    (tmp_path / "blocker").write_text("a file where the folder should be")
    target = tmp_path / "blocker" / "last.pt"
    with pytest.raises(InputError, match="cannot write the release checkpoint") as info:
        write_checkpoint({"step": 1}, target, what="release checkpoint")
    assert str(target) in str(info.value)
