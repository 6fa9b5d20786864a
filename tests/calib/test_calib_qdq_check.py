import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.qdq_check import check_qdq, check_qdq_file
from edge.errors import InputError

W = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 10 - 2


def build(act_scale=np.float32(0.05), act_zero=np.int8(0), w_scale=None, w_axis=0, opset=17, extra_nodes=(),
          extra_inits=(), outputs=("y",), conv_input="x_dq", bias=None):
    """x -> Q/DQ -> Conv (weight Q/DQ, per channel) -> y, with knobs to break one rule at a time."""
    w_scale = np.abs(W).reshape(2, -1).max(1).astype(np.float32) / 127 if w_scale is None else w_scale
    inits = [numpy_helper.from_array(np.asarray(act_scale), "x_scale"),
             numpy_helper.from_array(np.asarray(act_zero), "x_zero"),
             numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.asarray(w_scale, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(np.shape(w_scale), np.int8), "w_zero")] + list(extra_inits)
    conv_inputs = [conv_input, "w_dq"] + ([bias] if bias else [])
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="x_DQ"),
             helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["w_q"], name="w_Q", axis=w_axis),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="w_DQ", axis=w_axis),
             helper.make_node("Conv", conv_inputs, ["y"], name="conv", pads=[1, 1, 1, 1])] + list(extra_nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model):
    return sorted({(i.rule, i.node) for i in check_qdq(model).issues})


def test_a_conformant_model_passes():
    report = check_qdq(build())
    assert report.ok and not report.issues
    assert (report.quantize_nodes, report.dequantize_nodes) == (2, 2)
    assert (report.weighted_nodes, report.quantized_weighted_nodes) == (1, 1)
    assert "passes" in report.summary()


@pytest.mark.parametrize("model, expected", [
    (build(opset=12), ("QDQ001", "<model>")),
    (build(act_zero=np.int8(3)), ("QDQ002", "x_Q")),
    (build(act_zero=np.uint8(0)), ("QDQ003", "x_Q")),
    (build(act_scale=np.float32(-0.1)), ("QDQ004", "x_Q")),
    (build(act_scale=np.float32(np.inf)), ("QDQ004", "x_DQ")),
    (build(act_scale=np.array([0.1, 0.1, 0.1], np.float32)), ("QDQ005", "x_Q")),
    (build(w_axis=1, w_scale=np.full(3, 0.01, np.float32)), ("QDQ005", "w_Q")),
])
def test_each_broken_rule_names_its_node(model, expected):
    found = rules(model)
    assert expected in found, found
    assert not check_qdq(model).ok


def test_q_dq_pairs_must_match_and_dq_must_read_a_q():
    mismatched = build(extra_inits=[numpy_helper.from_array(np.float32(0.07), "other_scale")],
                       extra_nodes=[helper.make_node("DequantizeLinear", ["x_q", "other_scale", "x_zero"], ["z"],
                                                     name="odd_DQ")], outputs=("y", "z"))
    assert ("QDQ006", "odd_DQ") in rules(mismatched)
    loose = build(extra_nodes=[helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["z"], name="loose_DQ")],
                  outputs=("y", "z"))
    assert ("QDQ006", "loose_DQ") in rules(loose)


def test_int32_bias_dequantize_is_an_error():
    bias = [numpy_helper.from_array(np.array([5, -5], np.int32), "b_q"),
            numpy_helper.from_array(np.full(2, 1e-4, np.float32), "b_scale"),
            numpy_helper.from_array(np.zeros(2, np.int32), "b_zero")]
    model = build(extra_inits=bias, bias="b", extra_nodes=[
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], name="bias_DQ")])
    found = rules(model)
    assert ("QDQ006", "bias_DQ") in found and ("QDQ003", "bias_DQ") in found


def test_placement_warnings():
    half = build(conv_input="x")  # weight quantized, activation not
    report = check_qdq(half)
    assert report.ok and [(i.rule, i.node) for i in report.warnings] == [("QDQ007", "conv")]

    add = build(extra_nodes=[helper.make_node("Add", ["x_dq", "x"], ["s"], name="residual_add")], outputs=("y", "s"))
    assert ("QDQ008", "residual_add") in rules(add)

    concat_mixed = build(extra_nodes=[helper.make_node("Concat", ["x_dq", "x"], ["c"], name="cat", axis=1)],
                         outputs=("y", "c"))
    assert ("QDQ009", "cat") in rules(concat_mixed)
    concat_scales = build(
        extra_inits=[numpy_helper.from_array(np.float32(0.2), "s2")],
        extra_nodes=[helper.make_node("QuantizeLinear", ["x", "s2", "x_zero"], ["x_q2"], name="x_Q2"),
                     helper.make_node("DequantizeLinear", ["x_q2", "s2", "x_zero"], ["x_dq2"], name="x_DQ2"),
                     helper.make_node("Concat", ["x_dq", "x_dq2"], ["c"], name="cat", axis=1)],
        outputs=("y", "c"))
    assert ("QDQ009", "cat") in rules(concat_scales)

    on_output = build(extra_nodes=[helper.make_node("QuantizeLinear", ["y", "x_scale", "x_zero"], ["y_q"], name="y_Q"),
                                   helper.make_node("DequantizeLinear", ["y_q", "x_scale", "x_zero"], ["heatmap"],
                                                    name="heatmap_DQ")], outputs=("heatmap",))
    report = check_qdq(on_output)
    assert report.ok and ("QDQ010", "heatmap_DQ") in [(i.rule, i.node) for i in report.warnings]


def test_reads_files_and_reports_unreadable_ones(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build(act_zero=np.int8(1)), str(path))
    report = check_qdq_file(path)
    assert not report.ok and "error QDQ002 x_Q" in report.format()
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        check_qdq_file(tmp_path / "bad.onnx")
