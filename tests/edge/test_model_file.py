import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.decode.spec import DecodeSpec
from edge.errors import InputError
from edge.model_file import CARD_KEY, DECODE_KEY, PREPROCESS_KEY, ModelSpecs, read_model_specs
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec, Window


def relu_model(metadata=None) -> onnx.ModelProto:
    """A one-node ONNX model, optionally with metadata_props."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    return model


def save(model, path):
    onnx.save(model, str(path))
    return path


def specs():
    preprocess = PreprocessSpec(
        windows=(WINDOW_PRESETS["lung"], Window(40.0, 400.0, "mediastinum")),
        out_height=96, out_width=128, slices=3, pixel_size_mm=0.8, mean=0.25, std=0.5, dtype="float16",
    )
    decode = DecodeSpec(stride=2, score_threshold=0.42, max_elongation=None, min_slices=1)
    return ModelSpecs(preprocess, decode, {"name": "det", "version": "1.2", "training": {"epochs": 3}})


def test_specs_round_trip_through_onnx_metadata(tmp_path):
    original = specs()
    path = save(relu_model(original.to_metadata()), tmp_path / "m.onnx")
    loaded = read_model_specs(path)
    assert loaded == original
    assert loaded.preprocess.windows[1].name == "mediastinum"
    assert loaded.decode.max_elongation is None


def test_metadata_is_json_with_the_documented_keys():
    meta = specs().to_metadata()
    assert set(meta) == {PREPROCESS_KEY, DECODE_KEY, CARD_KEY}
    assert json.loads(meta[CARD_KEY])["training"] == {"epochs": 3}
    assert json.loads(meta[PREPROCESS_KEY])["slices"] == 3


def test_missing_card_gives_an_empty_card(tmp_path):
    meta = specs().to_metadata()
    del meta[CARD_KEY]
    assert read_model_specs(save(relu_model(meta), tmp_path / "m.onnx")).card == {}


def test_model_without_metadata_is_an_input_error_naming_file_and_keys(tmp_path):
    path = save(relu_model(), tmp_path / "bare.onnx")
    with pytest.raises(InputError) as e:
        read_model_specs(path)
    assert str(path) in str(e.value)
    assert PREPROCESS_KEY in str(e.value) and DECODE_KEY in str(e.value)


def test_bad_card_json_is_an_input_error(tmp_path):
    meta = dict(specs().to_metadata(), **{CARD_KEY: "{not json"})
    with pytest.raises(InputError, match="model card"):
        read_model_specs(save(relu_model(meta), tmp_path / "m.onnx"))


def test_file_that_is_not_onnx_is_an_input_error(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        read_model_specs(path)
