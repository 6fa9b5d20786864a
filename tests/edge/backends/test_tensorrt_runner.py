"""TensorRT runner: the file-level refusals that need no TensorRT run everywhere; building and running
a real engine needs tensorrt, pycuda and a CUDA GPU and is skipped (with the reason) elsewhere.
Nothing here imitates TensorRT."""

import hashlib
import importlib.util

import numpy as np
import pytest

from edge.backends.tensorrt_runner import TensorRtRunner, batch_within_profile, dims_to_shape
from edge.engine_manifest import (
    EngineManifest,
    EngineMismatchError,
    input_spec_sha256,
    manifest_path,
    write_manifest,
)
from edge.errors import InputError, MissingDependencyError
from edge.model_file import PREPROCESS_KEY
from edge.preprocess.spec import PreprocessSpec

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAVE_PYCUDA = importlib.util.find_spec("pycuda") is not None
SPEC = PreprocessSpec(slices=3, out_height=16, out_width=16)


def write_engine_and_manifest(tmp_path, engine_bytes=b"not a real plan", **overrides):
    engine = tmp_path / "model.engine"
    engine.write_bytes(engine_bytes)
    fields = dict(
        tensorrt_version="10.3.0.30", device_name="Orin", compute_capability="8.7", precision="fp32",
        input_name="input", input_shape=(-1, SPEC.channels, SPEC.out_height, SPEC.out_width),
        input_dtype="float32", input_spec_sha256=input_spec_sha256(SPEC),
        onnx_sha256=hashlib.sha256(b"onnx").hexdigest(), engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        min_batch=1, opt_batch=2, max_batch=4, model_metadata={PREPROCESS_KEY: SPEC.to_json()},
    )
    fields.update(overrides)
    write_manifest(EngineManifest(**fields), manifest_path(engine))
    return engine


def test_dims_and_profile_helpers():
    assert dims_to_shape((-1, 3, 256, 256)) == (None, 3, 256, 256)
    assert batch_within_profile(4, (1, 2, 4)) and not batch_within_profile(5, (1, 2, 4))
    assert not batch_within_profile(0, (1, 2, 4))


def test_engine_without_manifest_is_refused(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(InputError, match="model.engine.manifest.json: engine manifest not found"):
        TensorRtRunner(engine).activate()


def test_missing_engine_file_is_named(tmp_path):
    engine = write_engine_and_manifest(tmp_path)
    engine.unlink()
    with pytest.raises(InputError, match="model.engine: engine file not found"):
        TensorRtRunner(engine).activate()


def test_engine_changed_after_its_manifest_is_refused(tmp_path):
    engine = write_engine_and_manifest(tmp_path)
    engine.write_bytes(b"a different plan")
    with pytest.raises(EngineMismatchError, match="engine file differs from the one its manifest"):
        TensorRtRunner(engine).activate()


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the missing-dependency message cannot be shown")
def test_missing_tensorrt_is_reported_with_where_to_get_it(tmp_path):
    runner = TensorRtRunner(write_engine_and_manifest(tmp_path))
    with pytest.raises(MissingDependencyError, match="python3-libnvinfer"):
        runner.activate()
    assert not runner.is_active


def test_runner_must_be_active_before_use(tmp_path):
    runner = TensorRtRunner(write_engine_and_manifest(tmp_path))
    with pytest.raises(RuntimeError, match="must be activated"):
        runner.infer({"input": np.zeros((1, 3, 16, 16), np.float32)})


# -- with TensorRT, pycuda and a GPU


def tensorrt_gpu_or_skip():
    if not HAVE_TENSORRT:
        pytest.skip("tensorrt is not installed (JetPack apt python3-libnvinfer or a TensorRT workstation)")
    if not HAVE_PYCUDA:
        pytest.skip("pycuda is not installed (pip install 'ct-edge[gpu]')")
    onnx = pytest.importorskip("onnx", reason="building the test engine needs the onnx package")
    import pycuda.driver as driver

    try:
        driver.init()
        if driver.Device.count() < 1:
            pytest.skip("no CUDA device visible")
    except driver.Error as e:
        pytest.skip(f"CUDA is unusable here: {e}")
    import tensorrt as trt

    return trt, onnx, driver


def build_doubling_engine(tmp_path, trt, onnx, driver):
    """A real engine for y = 2 * x with a dynamic batch 1..4, and its manifest for this device."""
    from onnx import TensorProto, helper, numpy_helper

    shape = ["N", SPEC.channels, SPEC.out_height, SPEC.out_width]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "two"], ["heatmap"])], "double",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_bytes = model.SerializeToString()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_bytes), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    chw = tuple(shape[1:])
    profile.set_shape("input", (1,) + chw, (2,) + chw, (4,) + chw)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    device = driver.Device(0)
    major_cc, minor_cc = device.compute_capability()
    return write_engine_and_manifest(
        tmp_path, bytes(plan), tensorrt_version=trt.__version__, device_name=device.name(),
        compute_capability=f"{major_cc}.{minor_cc}", onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest())


def test_real_engine_runs_from_host_and_from_device_pointers(tmp_path):
    trt, onnx, driver = tensorrt_gpu_or_skip()
    engine = build_doubling_engine(tmp_path, trt, onnx, driver)
    x = np.random.default_rng(0).standard_normal((3, SPEC.channels, 16, 16)).astype(np.float32)
    with TensorRtRunner(engine, expected_input_spec=SPEC) as runner:
        assert runner.profile == (1, 2, 4)
        out = runner.infer({"input": x})
        np.testing.assert_array_equal(out["heatmap"], 2 * x)
        d_in, d_out = driver.mem_alloc(x.nbytes), driver.mem_alloc(x.nbytes)
        driver.memcpy_htod(d_in, x)
        runner.enqueue_device(3, int(d_in), {"heatmap": int(d_out)})
        runner.stream.synchronize()
        back = np.empty_like(x)
        driver.memcpy_dtoh(back, d_out)
        np.testing.assert_array_equal(back, 2 * x)
        d_in.free()
        d_out.free()


def test_real_engine_with_a_foreign_manifest_is_refused(tmp_path):
    trt, onnx, driver = tensorrt_gpu_or_skip()
    engine = build_doubling_engine(tmp_path, trt, onnx, driver)
    good = manifest_path(engine).read_text()
    manifest_path(engine).write_text(good.replace('"compute_capability": "', '"compute_capability": "1'))
    with pytest.raises(EngineMismatchError, match="compute capability differs"):
        TensorRtRunner(engine).activate()
    manifest_path(engine).write_text(good)
    other_spec = PreprocessSpec(slices=3, out_height=16, out_width=16, mean=0.5)
    with pytest.raises(EngineMismatchError, match="input spec differs"):
        TensorRtRunner(engine, expected_input_spec=other_spec).activate()
