import json
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from calib.qdq import QUANTIZATION_KEY, quantize_model
from calib.qdq_check import check_qdq
from calib.ranges import ActivationCollector, compute_ranges
from edge.backends.cpu_features import SATURATING_KERNELS, integer_kernels_saturate
from edge.errors import ConfigError
from edge.model_file import read_model_specs
from qdq_helpers import export_tiny_detector, tiny_inputs

SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny detector exported as the real export path does, its inputs and percentile ranges."""
    path = tmp_path_factory.mktemp("qdq") / "tiny.onnx"
    model, specs = export_tiny_detector(path, SIZE, seed=0, name="t")
    inputs = tiny_inputs(6, SIZE, seed=0)
    hist = ActivationCollector(path).collect(lambda: (inputs[i:i + 2] for i in range(0, 6, 2)))
    return path, model, inputs, compute_ranges(hist, "percentile"), specs


def run(model, x, optimize=False):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {model.graph.input[0].name: x})


def constants(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_tensorrt_layout_follows_the_placement_rules(tiny):
    _, model, _, amax, _ = tiny
    q = quantize_model(model, amax, "tensorrt")
    m = q.model
    assert check_qdq(m).ok and not check_qdq(m).warnings
    consts = constants(m)
    producers = {o: n for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    for conv in convs:
        act, weight = producers[conv.input[0]], producers[conv.input[1]]
        assert act.op_type == weight.op_type == "DequantizeLinear", conv.name
        w_scale = consts[weight.input[1]]
        w = consts[producers[weight.input[0]].input[0]]
        # per-channel on the output-channel axis, largest |w| -> 127
        assert {a.name: a.i for a in weight.attribute}["axis"] == 0
        np.testing.assert_allclose(w_scale, np.abs(w).reshape(w.shape[0], -1).max(1) / 127, rtol=1e-6)
        assert consts[act.input[1]].shape == ()  # per-tensor activation
        assert len(conv.input) < 3 or conv.input[2] in consts  # bias stays a float constant
    zero_points = [consts[n.input[2]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # graph outputs are never Q/DQ'd and every Concat input shares one scale
    assert not any(producers[o.name].op_type in ("QuantizeLinear", "DequantizeLinear") for o in m.graph.output)
    for concat in (n for n in m.graph.node if n.op_type == "Concat"):
        scales = {float(consts[producers[i].input[1]]) for i in concat.input}
        assert len(scales) == 1
    assert len(q.weight_tensors) == len(convs) and not q.float_nodes


def ranges_with_headroom(path, x):
    """Ranges 1.5x the largest FP32 values on these very inputs: quantization noise cannot push an activation
    out of its range, where the layouts may differ (TensorRT's int8 clips there, the CPU layout's uint8 not)."""
    fp32_max = compute_ranges(ActivationCollector(path).collect(lambda: iter([x])), "max")
    return {name: 1.5 * value for name, value in fp32_max.items()}


def test_both_layouts_compute_the_same_numbers_within_the_calibrated_ranges(tiny):
    path, model, inputs, _, _ = tiny
    x = inputs[:2]
    amax = ranges_with_headroom(path, x)
    trt = quantize_model(model, amax, "tensorrt")
    cpu = quantize_model(model, amax, "cpu")
    assert cpu.preactivation and check_qdq(trt.model).ok
    ref = run(model, x)
    a, b = run(trt.model, x), run(cpu.model, x)
    for name, fa, fb, r in zip(("heatmap", "size", "offset"), a, b, ref):
        np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-6, err_msg=name)  # equal up to float rounding
        assert 0 < np.abs(fa - r).max() < 0.05 * max(1e-3, np.abs(r).max()), name


@pytest.mark.skipif(integer_kernels_saturate(), reason=SATURATING_KERNELS)
def test_fused_integer_kernels_compute_what_the_qdq_graph_does(tiny):
    path, model, inputs, _, _ = tiny
    x = inputs[:2]
    amax = ranges_with_headroom(path, x)
    a = run(quantize_model(model, amax, "tensorrt").model, x)
    # ONNX Runtime's fused integer kernels round biases to int32: still within a few int8 steps
    for fc, fa in zip(run(quantize_model(model, amax, "cpu").model, x, optimize=True), a):
        np.testing.assert_allclose(fc, fa, rtol=0, atol=1e-3)


def test_cpu_layout_runs_as_integer_kernels_with_unsigned_activations(tiny):
    _, model, inputs, amax, _ = tiny
    cpu = quantize_model(model, amax, "cpu")
    m = cpu.model
    consts = constants(m)
    # the three sibling heads became one convolution; every Relu became a uint8 pair
    assert len(cpu.fused_heads) == 3 and not any(n.op_type == "Relu" for n in m.graph.node)
    convs_3x3 = sum(n.op_type == "Conv" for n in model.graph.node) - 3
    assert len(cpu.preactivation) == convs_3x3 - 2
    for node in m.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue
        zero = consts[node.input[2]]
        # only the graph input (a normalised image, negative below the window) keeps a signed type
        expected = np.int8 if node.input[0] == "input" else np.uint8
        assert zero.dtype == expected and not zero.any(), node.name
    weights = [consts[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts]
    assert len(weights) == len(cpu.weight_tensors) and all(w.dtype == np.int8 for w in weights)  # stored quantized
    fused = onnx_ops_after_optimization(m)
    assert fused["QLinearConv"] == convs_3x3 - 2  # every 3x3 convolution, the heads' as one
    assert fused["Relu"] == 0 and fused["QuantizeLinear"] == 1  # the input only: no requantization in between


@pytest.mark.skipif(integer_kernels_saturate(), reason=SATURATING_KERNELS)
def test_cpu_layout_integer_kernels_stay_near_the_tensorrt_layout(tiny):
    _, model, inputs, amax, _ = tiny
    # within a few int8 steps of the TensorRT layout on inputs beyond the calibrated ranges too
    trt = run(quantize_model(model, amax, "tensorrt").model, inputs)
    for fc, fa in zip(run(quantize_model(model, amax, "cpu").model, inputs, optimize=True), trt):
        assert np.abs(fc - fa).max() < 0.05 * max(1e-3, np.abs(fa).max())


def onnx_ops_after_optimization(model):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = f"{d}/opt.onnx"
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(f"{d}/opt.onnx").graph.node)


def test_specs_and_quantization_info_travel_in_the_model(tiny, tmp_path):
    _, model, _, amax, specs = tiny
    q = quantize_model(model, amax, "tensorrt", {"method": "percentile", "calibration_sha256": "ab" * 32})
    path = tmp_path / "q.onnx"
    onnx.save(q.model, str(path))
    assert read_model_specs(path) == specs
    info = json.loads({p.key: p.value for p in q.model.metadata_props}[QUANTIZATION_KEY])
    assert info["layout"] == "tensorrt" and info["method"] == "percentile"
    assert info["weight_tensors"] == len(q.weight_tensors)


def test_refuses_old_opsets_unknown_layouts_and_missing_ranges(tiny):
    _, model, _, amax, _ = tiny
    with pytest.raises(ConfigError, match="layout"):
        quantize_model(model, amax, "tflite")
    partial = {k: v for k, v in amax.items() if k != "input"}
    with pytest.raises(ConfigError, match="no calibrated range for tensor 'input'"):
        quantize_model(model, partial, "tensorrt")
    old = onnx.helper.make_model(model.graph, opset_imports=[onnx.helper.make_opsetid("", 12)])
    with pytest.raises(ConfigError, match="opset >= 13"):
        quantize_model(old, amax, "tensorrt")


def test_zero_range_tensors_and_pruned_channels_get_a_valid_scale(tiny):
    _, model, _, amax, _ = tiny
    zeroed = dict(amax, input=0.0)
    g = gs.import_onnx(model)
    conv = next(n for n in g.nodes if n.op == "Conv")
    w = conv.inputs[1].values.copy()
    w[0] = 0.0  # a pruned output channel
    conv.inputs[1] = gs.Constant(conv.inputs[1].name, w)
    pruned = gs.export_onnx(g)
    pruned.metadata_props.extend(model.metadata_props)
    q = quantize_model(pruned, zeroed, "tensorrt")
    assert q.zero_range == ["input"]
    assert check_qdq(q.model).ok  # every scale positive and finite


def residual_model():
    """x -> conv -> relu -> conv -> add(x) -> relu: a residual block with both Add inputs activations."""
    rng = np.random.default_rng(1)
    x = gs.Variable("x", np.float32, (1, 4, 8, 8))
    a, b, c, s = (gs.Variable(n, np.float32) for n in ("a", "b", "c", "s"))
    y = gs.Variable("y", np.float32, (1, 4, 8, 8))
    w1 = gs.Constant("w1", rng.normal(size=(4, 4, 3, 3)).astype(np.float32))
    w2 = gs.Constant("w2", rng.normal(size=(4, 4, 3, 3)).astype(np.float32))
    nodes = [gs.Node("Conv", "conv1", {"pads": [1, 1, 1, 1]}, [x, w1], [a]),
             gs.Node("Relu", "relu1", inputs=[a], outputs=[b]),
             gs.Node("Conv", "conv2", {"pads": [1, 1, 1, 1]}, [b, w2], [c]),
             gs.Node("Add", "add", inputs=[c, x], outputs=[s]),
             gs.Node("Relu", "relu2", inputs=[s], outputs=[y])]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17))
    model.ir_version = 8
    return model


def test_residual_add_gets_qdq_on_both_inputs(tmp_path):
    model = residual_model()
    onnx.save(model, str(tmp_path / "res.onnx"))
    x = np.random.default_rng(2).normal(size=(1, 4, 8, 8)).astype(np.float32)
    amax = compute_ranges(ActivationCollector(tmp_path / "res.onnx").collect(lambda: iter([x])), "max")
    assert sorted(amax) == ["a", "b", "c", "s", "x", "y"]
    q = quantize_model(model, amax, "tensorrt").model
    producers = {o: n for n in q.graph.node for o in n.output}
    add = next(n for n in q.graph.node if n.op_type == "Add")
    assert [producers[i].op_type for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    assert check_qdq(q).ok and not check_qdq(q).warnings
    ref = run(model, x)[0]
    assert np.abs(run(q, x)[0] - ref).max() < 0.05 * np.abs(ref).max()  # Q/DQ run as written
    if not integer_kernels_saturate():  # and as ONNX Runtime fuses it into integer kernels
        assert np.abs(run(q, x, optimize=True)[0] - ref).max() < 0.05 * np.abs(ref).max()


def test_head_tensors_are_the_inputs_of_each_heads_last_conv(tiny):
    from calib.ranges import head_tensors

    _, model, *_ = tiny
    names = head_tensors(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # two per head (the Relu output and the Conv output it reads), three heads
    assert len(names) == 6
    relu_outs = [n for n in names if producer[n].op_type == "Relu"]
    assert len(relu_outs) == 3
    for r in relu_outs:
        (last_conv,) = consumers[r]
        assert last_conv.op_type == "Conv"
        after = last_conv.output[0]
        outputs = {o.name for o in model.graph.output}
        assert after in outputs or any(c.op_type == "Sigmoid" and c.output[0] in outputs
                                       for c in consumers.get(after, []))
        assert producer[r].input[0] in names


def test_clipping_methods_keep_the_full_range_of_head_tensors():
    from calib.ranges import TensorHistogram

    tail = np.zeros(2048, np.int64)
    tail[:100] = 1000
    tail[-1] = 1  # a long tail: the rare large values are the detections
    hist = {"head": TensorHistogram("head", tail, absmax=8.0, size=int(tail.sum())),
            "body": TensorHistogram("body", tail, absmax=8.0, size=int(tail.sum()))}
    r = compute_ranges(hist, "percentile", keep_max=["head"])
    assert r["head"] == 8.0 and r["body"] < 8.0
