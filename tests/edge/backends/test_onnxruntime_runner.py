import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ingest"))

from ingest_helpers import blob_specs, build_blob_model  # noqa: E402

from edge.backends import cpu_features, onnxruntime_runner  # noqa: E402
from edge.backends.onnxruntime_runner import open_onnxruntime_runner  # noqa: E402
from edge.errors import InputError  # noqa: E402
from edge.model_file import QUANTIZATION_KEY  # noqa: E402


def test_open_reads_the_embedded_specs_and_runs(tmp_path):
    specs = blob_specs()
    runner, read = open_onnxruntime_runner(build_blob_model(tmp_path / "m.onnx", specs))
    try:
        assert read.preprocess == specs.preprocess and read.decode == specs.decode
        p = specs.preprocess
        out = runner.infer({"input": np.zeros((1, p.channels, p.out_height, p.out_width), np.float32)})
        assert set(out) == {"heatmap", "size", "offset"}
    finally:
        runner.deactivate()


def test_a_model_without_specs_is_a_user_error_and_the_session_is_closed(tmp_path, monkeypatch):
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["heatmap"])], "bare",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    closed = []
    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner

    original = OnnxRuntimeRunner.deactivate
    monkeypatch.setattr(OnnxRuntimeRunner, "deactivate", lambda self: closed.append(1) or original(self))
    with pytest.raises(InputError, match="bare.onnx.*lacks metadata"):
        open_onnxruntime_runner(path)
    assert closed == [1]


def _with_quantization_record(path):
    m = onnx.load(str(path))
    m.metadata_props.add(key=QUANTIZATION_KEY, value="{}")
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("saturate", [True, False])
def test_an_int8_model_is_refused_only_where_integer_kernels_saturate(tmp_path, monkeypatch, saturate):
    monkeypatch.setattr(onnxruntime_runner, "integer_kernels_saturate", lambda: saturate)
    plain = build_blob_model(tmp_path / "fp32.onnx", blob_specs())
    runner, _ = open_onnxruntime_runner(plain)  # an FP32 model runs everywhere
    runner.deactivate()
    int8 = _with_quantization_record(build_blob_model(tmp_path / "int8.onnx", blob_specs()))
    if saturate:
        with pytest.raises(InputError, match="int8.onnx.*INT8 model refused.*no VNNI.*use the FP32 model.*--qdq-as-written"):
            open_onnxruntime_runner(int8)
    else:
        open_onnxruntime_runner(int8)[0].deactivate()


def test_qdq_as_written_runs_an_int8_model_anywhere_with_graph_optimizations_off(tmp_path, monkeypatch):
    import onnxruntime as ort

    from edge.backends.onnxruntime_runner import OnnxRuntimeRunner

    monkeypatch.setattr(onnxruntime_runner, "integer_kernels_saturate", lambda: True)
    int8 = _with_quantization_record(build_blob_model(tmp_path / "int8.onnx", blob_specs()))
    with OnnxRuntimeRunner(int8, qdq_as_written=True) as runner:
        level = runner.session.get_session_options().graph_optimization_level
        assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with OnnxRuntimeRunner(build_blob_model(tmp_path / "fp32.onnx", blob_specs())) as runner:
        assert runner.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("machine,flags,expected", [
    ("x86_64", "fpu sse avx2 fma", True),
    ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
    ("x86_64", "fpu avx2 avx_vnni", False),
    ("aarch64", "fp asimd asimddp", False),
])
def test_integer_kernels_saturate_on_x86_without_vnni(tmp_path, monkeypatch, machine, flags, expected):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    assert cpu_features.integer_kernels_saturate(tmp_path / "cpuinfo") is expected
    assert cpu_features.integer_kernels_saturate(tmp_path / "absent") is False  # unreadable: trusted
