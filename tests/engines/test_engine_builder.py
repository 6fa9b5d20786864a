"""The builder's control flow, against a stand-in ``tensorrt`` module.

No machine here has TensorRT, so these tests check what *our* code does with
TensorRT's documented Python API (which flags, profile, calibrator, timing
cache, files and manifest; when it rebuilds) -- not that TensorRT builds an
engine. That needs the target device.
"""

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.decode.spec import DecodeSpec
from edge.engine_manifest import input_spec_sha256, manifest_path, read_manifest
from edge.errors import ConfigError, InputError
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec
from engines import builder
from engines.builder import (
    BuildRequest,
    EngineBuildError,
    TensorRtNotInstalled,
    build_engine,
    import_tensorrt,
    manifest_flags,
    precision_flags,
)
from engines.recipe import load_recipe

SPEC = PreprocessSpec(out_height=64, out_width=64, slices=3)


def tiny_onnx(path, with_specs=True):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])
    y = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", 3, 64, 64])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["input"], ["heatmap"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if with_specs:
        for k, v in ModelSpecs(SPEC, DecodeSpec(stride=2)).to_metadata().items():
            model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


class FakeTensorRT(types.ModuleType):
    """Records what the builder asks of TensorRT's Python API; "serializes" a description of it."""

    def __init__(self, version="10.3.0.30", parse_ok=True):
        super().__init__("tensorrt")
        self.__version__ = version
        self.parse_ok = parse_ok
        self.calls = []
        fake = self

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            def __init__(self):
                pass

        ILogger.Severity = Severity
        self.ILogger = ILogger
        self.BuilderFlag = types.SimpleNamespace(**{n: n for n in ("INT8", "FP16", "GPU_FALLBACK", "VERSION_COMPATIBLE")})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        self.OnnxParserFlag = types.SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")

        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                self.flags = flags
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0 if fake.parse_ok else 1

            def set_flag(self, flag):
                fake.calls.append(("parser_flag", flag))

            def parse(self, data, path):
                m = onnx.load_from_string(data)
                for i in m.graph.input:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
                    self.network.inputs.append(Tensor(i.name, dims))
                return fake.parse_ok

            def get_error(self, i):
                return types.SimpleNamespace(desc=lambda: "unsupported operator FancyOp")

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+tuned"

        class Config:
            def __init__(self):
                self.flags, self.pool, self.cache = [], {}, None
                self.builder_optimization_level = None
                self.default_device_type, self.DLA_core, self.int8_calibrator = "GPU", -1, None
                self.profiles, self.calibration_profile = [], None

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def set_flag(self, flag):
                self.flags.append(flag)

            def add_optimization_profile(self, p):
                self.profiles.append(p)

            def set_calibration_profile(self, p):
                self.calibration_profile = p

            def create_timing_cache(self, data):
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calib = config.int8_calibrator
                record = {"flags": config.flags, "workspace": config.pool.get("WORKSPACE"),
                          "level": config.builder_optimization_level, "device": config.default_device_type,
                          "dla": config.DLA_core, "profile": config.profiles[0].shapes,
                          "network_flags": network.flags, "timing_cache": config.cache is not None,
                          "calibration_cache": calib.read_calibration_cache() if calib else None,
                          "calibration_batch": calib.get_batch(["input"]) if calib else "n/a",
                          "calibration_profile": config.calibration_profile is not None}
                fake.calls.append(("build", record))
                return np.frombuffer(repr(record).encode(), np.uint8)

        self.Builder = Builder
        self.OnnxParser = Parser


@pytest.fixture
def fake_trt(monkeypatch):
    trt = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(builder, "gpu_identity", lambda device=0: ("Orin", "8.7"))
    return trt


def request(tmp_path, target="orin-jp6", precision="int8", **kw):
    onnx_path = kw.pop("onnx_path", None) or tiny_onnx(tmp_path / "m.onnx")
    recipe = kw.pop("recipe", None) or load_recipe(target)
    return BuildRequest(onnx_path, tmp_path / f"m.{recipe.name}.{precision}.engine", recipe, precision, **kw)


def test_missing_tensorrt_is_its_own_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRtNotInstalled, match="must be built on the target"):
        import_tensorrt()


def test_flags_per_target_and_precision():
    assert precision_flags(load_recipe("orin-jp6"), "int8") == ["INT8", "FP16"]
    assert precision_flags(load_recipe("orin-jp6"), "fp16") == ["FP16"]
    assert precision_flags(load_recipe("orin-jp6"), "fp32") == []
    assert precision_flags(load_recipe("orin-jp6-dla"), "int8") == ["INT8", "FP16", "GPU_FALLBACK"]
    assert precision_flags(load_recipe("workstation-trt11"), "int8") == []  # strongly typed: types from the Q/DQ ONNX
    assert "STRONGLY_TYPED" in manifest_flags(load_recipe("workstation-trt11"), "int8")
    assert "int8_mode=implicit" in manifest_flags(load_recipe("xavier-jp5-dla"), "int8")
    with pytest.raises(ConfigError, match="--fp32: target orin-jp6-dla builds int8, fp16 only"):
        precision_flags(load_recipe("orin-jp6-dla"), "fp32")


def test_explicit_int8_build_writes_engine_manifest_and_timing_cache(tmp_path, fake_trt):
    req = request(tmp_path, calibration_sha256="c" * 64, calibration_method="percentile")
    cache = tmp_path / "timing.cache"
    recipe = req.recipe.with_overrides(timing_cache=str(cache))
    req = BuildRequest(req.onnx_path, req.engine_path, recipe, "int8", None, "c" * 64, "percentile")
    result = build_engine(req, log=lambda _: None)
    assert result.rebuilt and result.engine_path.is_file()
    (_, record), = [c for c in fake_trt.calls if c[0] == "build"]
    assert record["flags"] == ["INT8", "FP16"] and record["workspace"] == 2048 << 20 and record["level"] == 3
    assert record["profile"] == {"input": ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))}
    assert record["network_flags"] == 0  # TensorRT 10: explicit batch is implicit, weakly typed recipe
    assert record["calibration_cache"] is None and record["device"] == "GPU"
    assert cache.read_bytes() == b"+tuned"
    m = read_manifest(manifest_path(req.engine_path))
    assert (m.tensorrt_version, m.device_name, m.compute_capability) == ("10.3.0.30", "Orin", "8.7")
    assert (m.precision, m.calibration_method, m.calibration_sha256) == ("int8", "percentile", "c" * 64)
    assert (m.min_batch, m.opt_batch, m.max_batch) == (1, 4, 8) and m.input_shape == (-1, 3, 64, 64)
    assert m.input_spec_sha256 == input_spec_sha256(SPEC) and "ct_edge.preprocess" in m.model_metadata
    assert "target=orin-jp6" in m.flags and m.dla_core is None


def test_rebuilds_only_when_a_build_input_changes(tmp_path, fake_trt):
    req = request(tmp_path, calibration_sha256="c" * 64, calibration_method="entropy")
    assert build_engine(req, log=lambda _: None).rebuilt
    again = build_engine(req, log=lambda _: None)
    assert not again.rebuilt and again.reason.startswith("up to date")
    assert build_engine(req, force=True, log=lambda _: None).reason == "forced"
    other_cal = BuildRequest(req.onnx_path, req.engine_path, req.recipe, "int8", None, "d" * 64, "entropy")
    result = build_engine(other_cal, log=lambda _: None)
    assert result.rebuilt and result.reason == "changed: calibration_sha256"
    bigger = BuildRequest(req.onnx_path, req.engine_path, req.recipe.with_overrides(workspace_mib=4096), "int8", None,
                          "d" * 64, "entropy")
    assert build_engine(bigger, log=lambda _: None).reason == "changed: flags"
    req.engine_path.write_bytes(b"tampered")
    assert build_engine(bigger, log=lambda _: None).reason == "engine file does not match its manifest"
    n_builds = sum(c[0] == "build" for c in fake_trt.calls)
    assert n_builds == 5


def test_implicit_int8_on_dla_reads_our_calibration_cache(tmp_path, fake_trt):
    cache = tmp_path / "m.calib.cache"
    cache.write_text("TRT-100300-EntropyCalibration2\ninput: 3c010204\n")
    req = request(tmp_path, target="orin-jp6-dla", calibration_cache=cache, calibration_method="percentile")
    result = build_engine(req, log=lambda _: None)
    (_, record), = [c for c in fake_trt.calls if c[0] == "build"]
    assert record["calibration_cache"] == cache.read_bytes()
    assert record["calibration_batch"] is None  # never asks for data: everything comes from the cache
    assert record["calibration_profile"] and record["device"] == "DLA" and record["dla"] == 0
    assert record["flags"] == ["INT8", "FP16", "GPU_FALLBACK"]
    assert record["profile"]["input"][0] == record["profile"]["input"][2] == (1, 3, 64, 64)
    m = result.manifest
    assert m.dla_core == 0 and m.gpu_fallback and len(m.calibration_sha256) == 64


def test_tensorrt_8_networks_are_created_explicit_batch(tmp_path, monkeypatch):
    trt = FakeTensorRT(version="8.5.2.2")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(builder, "gpu_identity", lambda device=0: ("Xavier", "7.2"))
    build_engine(request(tmp_path, target="xavier-jp5", precision="fp16"), log=lambda _: None)
    (_, record), = [c for c in trt.calls if c[0] == "build"]
    assert record["network_flags"] == 1 << 0 and record["level"] is None and record["flags"] == ["FP16"]


def test_errors_name_the_problem(tmp_path, monkeypatch, fake_trt):
    with pytest.raises(ConfigError, match="is for TensorRT 8.5.2, this machine has 10.3.0.30"):
        build_engine(request(tmp_path, target="xavier-jp5", precision="fp16"), log=lambda _: None)
    with pytest.raises(InputError, match="lacks its preprocessing spec"):
        build_engine(request(tmp_path, onnx_path=tiny_onnx(tmp_path / "bare.onnx", with_specs=False)),
                     log=lambda _: None)
    with pytest.raises(ConfigError, match="needs a calibration cache"):
        build_engine(request(tmp_path, target="orin-jp6-dla"), log=lambda _: None)
    fake_trt.parse_ok = False
    with pytest.raises(EngineBuildError, match="ONNX parser failed: unsupported operator FancyOp"):
        build_engine(request(tmp_path), log=lambda _: None)
