"""What a model file carries besides its graph: the specs it was trained with.

The preprocessing spec, the decode spec and a small model card travel inside the
ONNX file as ``metadata_props``, so the runtime needs exactly one file. Reading
goes through ONNX Runtime (no ``onnx`` package on the device).
"""

import json
from dataclasses import dataclass, field
from typing import Mapping

from edge.decode.spec import DecodeSpec
from edge.errors import InputError
from edge.preprocess.spec import PreprocessSpec

PREPROCESS_KEY = "ct_edge.preprocess"
DECODE_KEY = "ct_edge.decode"
CARD_KEY = "ct_edge.model_card"
QUANTIZATION_KEY = "ct_edge.quantization"  # INT8 files only: written by calib.qdq


@dataclass(frozen=True)
class ModelSpecs:
    """Everything the runtime needs to feed a model and read its outputs."""

    preprocess: PreprocessSpec
    decode: DecodeSpec
    card: dict = field(default_factory=dict)

    def to_metadata(self) -> dict:
        return {
            PREPROCESS_KEY: self.preprocess.to_json(),
            DECODE_KEY: self.decode.to_json(),
            CARD_KEY: json.dumps(self.card, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source="<model>") -> "ModelSpecs":
        missing = [k for k in (PREPROCESS_KEY, DECODE_KEY) if k not in meta]
        if missing:
            raise InputError(source, f"model file lacks metadata {', '.join(missing)}: export it with tools/export_onnx.py")
        try:
            card = json.loads(meta.get(CARD_KEY, "{}"))
        except ValueError as e:
            raise InputError(source, f"model card metadata is not JSON: {e}") from None
        return cls(PreprocessSpec.from_json(meta[PREPROCESS_KEY]), DecodeSpec.from_json(meta[DECODE_KEY]), card)


def read_model_specs(path) -> ModelSpecs:
    """Read the specs embedded in an ONNX model file."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several unrelated exception types for bad models
        raise InputError(path, f"not a loadable ONNX model: {e}") from None
    return ModelSpecs.from_metadata(sess.get_modelmeta().custom_metadata_map, source=path)
