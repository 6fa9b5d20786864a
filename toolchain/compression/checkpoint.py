"""Detector checkpoints for compressed models, in the format :func:`toolchain.export.onnx_export.load_checkpoint` reads.

Keys: ``arch`` (with per-conv widths, :mod:`toolchain.compression.arch`),
``state_dict``, ``preprocess``, ``decode``, ``card``. Training checkpoints
(:class:`~toolchain.training.trainer.Trainer`) add ``optimizer``, ``step`` and
friends to the same keys.
"""

import contextlib
import os
from pathlib import Path

import torch

from edge.errors import InputError
from edge.model_file import ModelSpecs
from toolchain.compression.arch import arch_of
from toolchain.compression.flops import count_parameters


def checkpoint_extra(model, specs: ModelSpecs, card: dict) -> dict:
    """Everything but the weights: the dict :class:`Trainer` takes as ``checkpoint_extra``."""
    card = dict(card, parameters=count_parameters(model))
    return {"arch": arch_of(model), "preprocess": specs.preprocess.to_dict(), "decode": specs.decode.to_dict(),
            "card": card}


def write_checkpoint(state: dict, path, what: str = "checkpoint") -> Path:
    """``torch.save`` ``state`` to ``path`` atomically (missing folders are made); an InputError naming ``path``
    (and ``what``) on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # torch.save on a path reports an unwritable folder as a RuntimeError
            torch.save(state, f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # e.g. its folder is a file
            tmp.unlink(missing_ok=True)
        raise InputError(path, f"cannot write the {what}: {e.strerror or e}") from None
    return path


def save_checkpoint(path, model, specs: ModelSpecs, card: dict) -> Path:
    """Write an inference checkpoint (no optimizer state) atomically."""
    return write_checkpoint(dict(checkpoint_extra(model, specs, card), state_dict=model.state_dict()), path)
