"""A uniform weight average of checkpoints of one architecture (a "model soup").

Meant for runs fine-tuned from the same starting weights (the students of one GPU round); averaging
unrelated networks gives a broken model. BatchNorm running statistics are averaged like the weights.
The specs (preprocess, decode) and card are the first checkpoint's; re-tune the decode afterwards.
"""

from pathlib import Path
from typing import Sequence

from edge.errors import InputError
from toolchain.compression.checkpoint import write_checkpoint
from toolchain.export.onnx_export import _read_checkpoint, model_from_checkpoint


def average_checkpoints(srcs: Sequence, dst) -> Path:
    """Write the mean of ``srcs``' float weights to ``dst`` (float32, no optimizer state)."""
    srcs, dst = [Path(s) for s in srcs], Path(dst)
    if len(srcs) < 2:
        raise InputError(dst, f"averaging needs at least two checkpoints, got {len(srcs)}")
    first = _read_checkpoint(srcs[0])
    model_from_checkpoint(first, srcs[0])
    total = {k: v.float() for k, v in first["state_dict"].items() if v.is_floating_point()}
    for src in srcs[1:]:
        ckpt = _read_checkpoint(src)
        for key in ("arch", "preprocess"):
            if ckpt[key] != first[key]:
                raise InputError(src, f"its '{key}' differs from {srcs[0].name}'s: only one architecture "
                                      "and preprocessing can be averaged")
        model_from_checkpoint(ckpt, src)
        for k in total:
            total[k] += ckpt["state_dict"][k].float()
    state = {k: total[k] / len(srcs) if k in total else v for k, v in first["state_dict"].items()}
    card = dict(first.get("card", {}), averaged_from=[str(s) for s in srcs])
    out = {k: first[k] for k in ("arch", "preprocess", "decode") if k in first}
    out.update(card=card, step=first.get("step", 0), state_dict=state)
    return write_checkpoint(out, dst, "averaged checkpoint")
