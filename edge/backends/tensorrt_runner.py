"""TensorRT backend: a serialized engine, checked against its manifest, run with named tensors.

Written against the API common to TensorRT 8.5 (JetPack 5, Xavier), 10.x
(JetPack 6, Orin; workstations) and 11.x: ``num_io_tensors`` /
``get_tensor_name`` / ``get_tensor_mode``, ``set_input_shape`` for the dynamic
batch, ``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream. The
binding-index API (``execute_async_v2``, removed in 10.0) is not used, so 8.5
is the oldest version accepted. tensorrt and pycuda are imported on
activation only.

Two ways in: :meth:`TensorRtRunner.infer` (host NumPy arrays, the Runner
interface) and :meth:`TensorRtRunner.enqueue_device` (device addresses on the
caller's stream: the zero-copy pipeline in :mod:`edge.gpu.pipeline`).
"""

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from edge.backends.base import Runner, TensorMeta
from edge.engine_manifest import (
    EngineManifest,
    EngineMismatchError,
    RuntimeEnvironment,
    manifest_path,
    parse_version,
    read_manifest,
    validate_manifest,
)
from edge.errors import EdgeError, InputError, MissingDependencyError
from edge.preprocess.spec import PreprocessSpec

MIN_TENSORRT = (8, 5)


def import_tensorrt():
    """The ``tensorrt`` module, or MissingDependencyError saying where it comes from."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(
            "the TensorRT backend needs the tensorrt Python bindings: on Jetson they come from JetPack "
            f"(apt install python3-libnvinfer, see jetson/install.sh), never from pip on the device ({e})"
        ) from None
    version = parse_version(tensorrt.__version__) or (0,)
    if version[:2] < MIN_TENSORRT:
        raise MissingDependencyError(
            f"TensorRT {tensorrt.__version__} is too old: the runtime needs >= "
            f"{'.'.join(map(str, MIN_TENSORRT))} (named tensors and execute_async_v3)")
    return tensorrt


def dims_to_shape(dims) -> Tuple[Optional[int], ...]:
    """TensorRT Dims -> tuple with None for dynamic (-1) dimensions."""
    return tuple(None if int(d) < 0 else int(d) for d in dims)


def batch_within_profile(batch: int, profile: Tuple[int, int, int]) -> bool:
    return profile[0] <= batch <= profile[2]


class TensorRtRunner(Runner):
    """Runs a TensorRT engine whose manifest (:mod:`edge.engine_manifest`) matches this device.

    ``expected_input_spec``: the preprocessing spec the caller will feed; the engine
    is refused unless it was built for exactly that spec. ``cuda_context``: an
    active :class:`edge.gpu.cuda_context.CudaContext` to share; by default the
    runner retains the device's primary context itself.
    """

    name = "tensorrt"

    def __init__(self, engine_path, manifest_file=None, *, expected_input_spec: Optional[PreprocessSpec] = None,
                 allow_other_device_model: bool = False, device_index: int = 0, cuda_context=None,
                 host_memory: str = "auto", log_severity: str = "WARNING"):
        super().__init__()
        self.engine_path = Path(engine_path)
        self.manifest_file = Path(manifest_file) if manifest_file is not None else manifest_path(engine_path)
        self.expected_input_spec = expected_input_spec
        self.allow_other_device_model = allow_other_device_model
        self.device_index = device_index
        self.host_memory = host_memory
        self.log_severity = log_severity
        self.manifest: Optional[EngineManifest] = None
        self._cuda_context = cuda_context
        self._owns_context = False
        self._trt = self._driver = None
        self._runtime = self._engine = self._context = None
        self.stream = None
        self.input_name = ""
        self._input_chw: Tuple[int, int, int] = (0, 0, 0)
        self._input_dtype = np.dtype(np.float32)
        self._outputs: "OrderedDict[str, np.dtype]" = OrderedDict()
        self.profile: Tuple[int, int, int] = (1, 1, 1)
        self._current_batch: Optional[int] = None
        self._output_shapes: Dict[int, Dict[str, Tuple[Tuple[int, ...], np.dtype]]] = {}
        self._host_io = None  # (input HostDeviceBuffer, {name: HostDeviceBuffer}) for infer()

    # -- activation

    def _read_engine(self) -> Tuple[EngineManifest, bytes]:
        """Manifest and engine bytes, checked against each other (no TensorRT needed)."""
        manifest = read_manifest(self.manifest_file)
        try:
            data = self.engine_path.read_bytes()
        except FileNotFoundError:
            raise InputError(self.engine_path, "engine file not found") from None
        except OSError as e:
            raise InputError(self.engine_path, f"cannot read engine: {e.strerror or e}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.engine_sha256:
            raise EngineMismatchError(
                f"{self.engine_path}: refusing this engine: engine file differs from the one its manifest "
                f"{self.manifest_file} describes (sha256 {digest[:12]}... vs {manifest.engine_sha256[:12]}...)")
        return manifest, data

    def _activate_impl(self):
        manifest, data = self._read_engine()
        trt = import_tensorrt()
        from edge.gpu.cuda_context import CudaContext, import_pycuda_driver

        self._driver = import_pycuda_driver()
        if self._cuda_context is None:
            self._cuda_context = CudaContext(self.device_index).activate()
            self._owns_context = True
        try:
            self._activate_engine(trt, manifest, data)
        except BaseException:
            self._release()
            raise

    def _activate_engine(self, trt, manifest: EngineManifest, data: bytes) -> None:
        props = self._cuda_context.properties
        severity = getattr(trt.Logger, self.log_severity, trt.Logger.WARNING)
        self._runtime = trt.Runtime(trt.Logger(severity))
        env = RuntimeEnvironment(trt.__version__, props.name, props.compute_capability_str,
                                 int(getattr(self._runtime, "num_DLA_cores", 0)))
        validate_manifest(manifest, env, engine_path=self.engine_path,
                          expected_input_spec=self.expected_input_spec,
                          allow_other_device_model=self.allow_other_device_model)
        if manifest.dla_core is not None:
            self._runtime.DLA_core = manifest.dla_core
        if manifest.version_compatible:
            # A version-compatible plan embeds the lean runtime (host code): trusted because its
            # sha256 matched the manifest written by our builder.
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise EngineMismatchError(f"{self.engine_path}: TensorRT {trt.__version__} could not deserialize the "
                                      "engine (see the TensorRT log above); rebuild it on this device")
        self._trt = trt
        self._inspect_io(trt, manifest)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EdgeError(f"{self.engine_path}: TensorRT could not create an execution context "
                            "(out of GPU memory?)")
        self.stream = self._driver.Stream()
        self.manifest = manifest

    def _inspect_io(self, trt, manifest: EngineManifest) -> None:
        engine = self._engine
        inputs, outputs = [], OrderedDict()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError:
                raise EngineMismatchError(f"{self.engine_path}: tensor {name!r} has type "
                                          f"{engine.get_tensor_dtype(name)}, which NumPy cannot hold") from None
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append((name, dtype, dims_to_shape(engine.get_tensor_shape(name))))
            else:
                outputs[name] = dtype
            if _tensor_format(engine, name) != trt.TensorFormat.LINEAR:
                raise EngineMismatchError(
                    f"{self.engine_path}: tensor {name!r} uses format {_tensor_format(engine, name)}; the runtime "
                    "reads and writes linear NCHW: build with linear I/O formats")
        if len(inputs) != 1:
            raise EngineMismatchError(f"{self.engine_path}: expected one input tensor, the engine has "
                                      f"{[n for n, _, _ in inputs]}")
        name, dtype, shape = inputs[0]
        problems = []
        if name != manifest.input_name:
            problems.append(f"input name is {name!r}, manifest says {manifest.input_name!r}")
        if dtype != np.dtype(manifest.input_dtype):
            problems.append(f"input dtype is {dtype}, manifest says {manifest.input_dtype}")
        if len(shape) != 4 or tuple(shape[1:]) != tuple(manifest.input_shape[1:]):
            problems.append(f"input shape is {shape}, manifest says {list(manifest.input_shape)}")
        if problems:
            raise EngineMismatchError(f"{self.engine_path}: engine and manifest disagree: " + "; ".join(problems))
        self.input_name, self._input_dtype, self._input_chw = name, dtype, tuple(shape[1:])
        self._outputs = outputs
        if shape[0] is None:
            self.profile = _profile_batches(engine, name)
        else:
            self.profile = (shape[0],) * 3

    def _deactivate_impl(self):
        self._release()

    def _release(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        if self._host_io is not None:
            host_in, host_out = self._host_io
            for buf in [host_in, *host_out.values()]:
                buf.free()
            self._host_io = None
        # Context before engine before runtime: the reverse of creation.
        self._context = self._engine = self._runtime = None
        self.stream = None
        self._output_shapes.clear()
        self._current_batch = None
        if self._owns_context and self._cuda_context is not None:
            self._cuda_context.release()
            self._cuda_context = None
            self._owns_context = False

    # -- metadata

    def _input_metadata_impl(self):
        return OrderedDict({self.input_name: TensorMeta(self.input_name, self._input_dtype,
                                                        (None,) + tuple(self._input_chw))})

    def custom_metadata(self) -> dict:
        """The ONNX metadata_props the builder copied into the manifest (specs, model card)."""
        self._require_active()
        return dict(self.manifest.model_metadata)

    def input_binding(self) -> Tuple[Tuple[int, int, int], np.dtype]:
        self._require_active()
        return tuple(self._input_chw), self._input_dtype

    def output_shapes(self, batch: int) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """Output shapes and dtypes for an input batch of ``batch`` (sets the input shape)."""
        self._require_active()
        if batch not in self._output_shapes:
            self._set_batch(batch)
            shapes = {}
            for name, dtype in self._outputs.items():
                shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EdgeError(f"{self.engine_path}: output {name!r} has data-dependent shape {shape}; "
                                    "the runtime needs output shapes known from the input shape")
                shapes[name] = (shape, dtype)
            self._output_shapes[batch] = shapes
        return self._output_shapes[batch]

    # -- execution

    def _set_batch(self, batch: int) -> None:
        if not batch_within_profile(batch, self.profile):
            raise EdgeError(f"{self.engine_path}: batch {batch} outside the engine's optimization profile "
                            f"{self.profile[0]}..{self.profile[2]}")
        if batch != self._current_batch:
            shape = (int(batch),) + tuple(self._input_chw)
            if not self._context.set_input_shape(self.input_name, shape):
                raise EdgeError(f"{self.engine_path}: TensorRT refused input shape {shape}")
            self._current_batch = batch

    def enqueue_device(self, batch: int, input_ptr: int, output_ptrs: Mapping[str, int], stream=None) -> None:
        """Enqueue one inference on ``stream`` (a pycuda Stream; default the runner's) reading the
        input at device address ``input_ptr`` and writing each output to ``output_ptrs[name]``.
        Addresses must stay valid until the stream passes this point."""
        self._require_active()
        missing = sorted(set(self._outputs) - set(output_ptrs))
        if missing:
            raise EdgeError(f"{self.name}: no device address given for output(s) {missing}")
        self._set_batch(batch)
        if not self._context.set_tensor_address(self.input_name, int(input_ptr)):
            raise EdgeError(f"{self.engine_path}: TensorRT refused the address of input {self.input_name!r}")
        for name in self._outputs:
            if not self._context.set_tensor_address(name, int(output_ptrs[name])):
                raise EdgeError(f"{self.engine_path}: TensorRT refused the address of output {name!r}")
        handle = (stream if stream is not None else self.stream).handle
        if not self._context.execute_async_v3(handle):
            raise EdgeError(f"{self.engine_path}: execute_async_v3 failed (see the TensorRT log above)")

    def _host_buffers(self):
        if self._host_io is None:
            from edge.gpu.mapped_buffers import HostDeviceBuffer, choose_host_memory

            mode = choose_host_memory(self._cuda_context.properties, self.host_memory)
            max_batch = self.profile[2]
            host_in = HostDeviceBuffer((max_batch,) + tuple(self._input_chw), self._input_dtype, mode)
            host_out = {name: HostDeviceBuffer(shape, dtype, mode)
                        for name, (shape, dtype) in self.output_shapes(max_batch).items()}
            self._host_io = (host_in, host_out)
        return self._host_io

    def _infer_impl(self, feed):
        array = np.ascontiguousarray(feed[self.input_name])
        batch = array.shape[0]
        if not batch_within_profile(batch, self.profile):
            raise EdgeError(f"{self.name}: batch {batch} outside the engine's optimization profile "
                            f"{self.profile[0]}..{self.profile[2]}")
        host_in, host_out = self._host_buffers()
        host_in.host[:batch] = array
        host_in.to_device(self.stream, nbytes=array.nbytes)
        shapes = self.output_shapes(batch)
        self.enqueue_device(batch, host_in.device_ptr, {n: b.device_ptr for n, b in host_out.items()}, self.stream)
        for name, (shape, dtype) in shapes.items():
            host_out[name].to_host(self.stream, nbytes=int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.stream.synchronize()
        return OrderedDict((name, host_out[name].host.reshape(-1)[:int(np.prod(shape))].reshape(shape).copy())
                           for name, (shape, _) in shapes.items())


def _tensor_format(engine, name):
    try:
        return engine.get_tensor_format(name, 0)  # TensorRT >= 10: per profile
    except TypeError:
        return engine.get_tensor_format(name)  # TensorRT 8.5 / 8.6


def _profile_batches(engine, name) -> Tuple[int, int, int]:
    """(min, opt, max) batch of profile 0."""
    try:
        shapes = engine.get_tensor_profile_shape(name, 0)
    except AttributeError:  # TensorRT 8.5 without the named overload
        shapes = engine.get_profile_shape(0, name)
    return tuple(int(s[0]) for s in shapes)


def open_tensorrt_runner(engine_path):
    """Activate the engine at ``engine_path`` and read the model specs its manifest carries."""
    from edge.model_file import ModelSpecs

    runner = TensorRtRunner(engine_path).activate()
    try:
        specs = ModelSpecs.from_metadata(runner.custom_metadata(), source=engine_path)
        runner.expected_input_spec = specs.preprocess
    except BaseException:
        runner.deactivate()
        raise
    return runner, specs
