"""A release copy of a training checkpoint: weights in float16 storage, no optimizer state.

Half the size of the float32 weights and a fraction of a resumable checkpoint;
:func:`toolchain.export.onnx_export.load_checkpoint` loads it as float32.
"""

from pathlib import Path
from typing import Optional

from edge.decode.spec import DecodeSpec
from toolchain.compression.checkpoint import write_checkpoint
from toolchain.export.onnx_export import _read_checkpoint, model_from_checkpoint

KEPT_KEYS = ("arch", "preprocess", "decode", "card", "step", "best_val", "train_config")


def release_checkpoint(src, dst, decode: Optional[DecodeSpec] = None) -> Path:
    """Write ``src``'s model and specs to ``dst`` with float16 weights; ``decode`` replaces its decode spec."""
    src, dst = Path(src), Path(dst)
    ckpt = _read_checkpoint(src)
    model_from_checkpoint(ckpt, src)  # the whole model must load before a release copy is made
    out = {k: ckpt[k] for k in KEPT_KEYS if k in ckpt}
    if decode is not None:
        out["decode"] = decode.to_dict()
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    return write_checkpoint(out, dst, "release checkpoint")
