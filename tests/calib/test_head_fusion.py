import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from calib.head_fusion import fuse_parallel_heads
from calib.ranges import ActivationCollector, compute_ranges
from edge.model_file import read_model_specs
from qdq_helpers import export_tiny_detector, tiny_inputs

SIZE = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "m.onnx"
    model, specs = export_tiny_detector(path, SIZE, seed=1, name="h")
    x = tiny_inputs(2, SIZE, seed=1)
    amax = compute_ranges(ActivationCollector(path).collect(lambda: iter([x])), "max")
    return path, model, x, amax, specs


def run(model, x, outputs=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"input": x})


def expose(model, names):
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return m


def test_fused_heads_compute_the_same_outputs_with_one_wide_convolution(exported, tmp_path):
    path, model, x, amax, specs = exported
    fusion = fuse_parallel_heads(model, amax)
    assert len(fusion.fused) == 3
    ops = [n.op_type for n in fusion.model.graph.node]
    assert ops.count("Conv") == sum(n.op_type == "Conv" for n in model.graph.node) - 4 and ops.count("Split") == 1
    assert [o.name for o in fusion.model.graph.output] == ["heatmap", "size", "offset"]
    for a, b in zip(run(model, x), run(fusion.model, x)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    onnx.save(fusion.model, str(tmp_path / "f.onnx"))
    assert read_model_specs(tmp_path / "f.onnx") == specs  # the embedded specs travel


def test_equalization_gives_every_head_the_full_range(exported):
    _, model, x, amax, _ = exported
    heads = ("heatmap", "size", "offset")
    ranges = [amax[f"/model/{h}/conv/conv.2/Relu_output_0"] for h in heads]
    assert max(ranges) > 1.2 * min(ranges)  # the heads' ranges differ: fusing alone would waste resolution
    fusion = fuse_parallel_heads(model, amax)
    relu = next(n.output[0] for n in fusion.model.graph.node if n.op_type == "Relu" and "fused_heads" in n.name)
    (features,) = run(expose(fusion.model, [relu]), x, [relu])
    per_head = features.reshape(2, 3, -1, SIZE // 2, SIZE // 2).max(axis=(0, 2, 3, 4))
    np.testing.assert_allclose(per_head, max(ranges), rtol=1e-4)
    assert fusion.amax[relu] == pytest.approx(max(ranges))


def test_heads_are_left_alone_when_an_intermediate_tensor_has_another_reader(exported):
    _, model, _, amax, _ = exported
    g = gs.import_onnx(model)
    r = next(n for n in g.nodes if n.name == "/model/size/conv/conv.2/Relu").outputs[0]
    g.outputs.append(r.to_variable(dtype=np.float32))
    tapped = gs.export_onnx(g)
    fusion = fuse_parallel_heads(tapped, amax)
    assert sorted(fusion.fused) == ["/model/heatmap/conv/conv.0/Conv", "/model/offset/conv/conv.0/Conv"]
    single = fuse_parallel_heads(gs.export_onnx(_only_heatmap(model)), amax)
    assert single.fused == [] and single.amax == dict(amax)


def _only_heatmap(model):
    g = gs.import_onnx(model)
    g.outputs = [t for t in g.outputs if t.name == "heatmap"]
    return g.cleanup()
