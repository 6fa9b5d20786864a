"""ONNX Runtime backend: the CPU default (and the reference TensorRT is compared against)."""

from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from edge.backends.base import Runner, TensorMeta
from edge.backends.cpu_features import SATURATING_KERNELS, integer_kernels_saturate
from edge.errors import InputError
from edge.model_file import QUANTIZATION_KEY

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
}


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with ONNX Runtime (CPU execution provider by default).

    ``qdq_as_written`` runs an INT8 model's QuantizeLinear / DequantizeLinear nodes as they are in
    the file (graph optimizations off: float arithmetic, no fused integer kernels). Slower, and
    correct on every CPU: the way to measure INT8 accuracy where the fused kernels saturate.
    """

    name = "onnxruntime"

    def __init__(self, model_path, providers: Optional[Sequence[str]] = None, intra_op_threads: int = 0,
                 qdq_as_written: bool = False):
        super().__init__()
        self.model_path = str(model_path)
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads
        self.qdq_as_written = qdq_as_written
        self.session = None

    def _activate_impl(self):
        self.session = create_session(self.model_path, self.model_path, self.providers, self.intra_op_threads,
                                      graph_optimizations=not self.qdq_as_written)

    def _deactivate_impl(self):
        self.session = None

    def _input_metadata_impl(self):
        meta = OrderedDict()
        for i in self.session.get_inputs():
            shape = tuple(d if isinstance(d, int) else None for d in i.shape)
            meta[i.name] = TensorMeta(i.name, _ORT_TYPES.get(i.type, np.dtype(np.float32)), shape)
        return meta

    def _infer_impl(self, feed):
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, dict(feed))
        return OrderedDict(zip(names, outs))

    def custom_metadata(self) -> dict:
        """The ONNX file's metadata_props (where the preprocessing and decode specs travel)."""
        self._require_active()
        return dict(self.session.get_modelmeta().custom_metadata_map)


def create_session(model, source, providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0,
                   graph_optimizations: bool = True):
    """An ONNX Runtime session for ``model`` (a path or serialized bytes; ``source`` names it in errors).

    With ``graph_optimizations`` off, Q/DQ nodes run as written (float arithmetic, no fused integer
    kernels). With them on, an INT8 model is refused on the CPU where those kernels saturate.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if graph_optimizations
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        session = ort.InferenceSession(model, sess_options=opts, providers=list(providers))
    except Exception as e:  # ORT raises several unrelated exception types for bad models
        raise InputError(source, f"ONNX Runtime cannot load the model: {e}") from None
    if (graph_optimizations and list(providers) == ["CPUExecutionProvider"] and _is_int8(session)
            and integer_kernels_saturate()):
        raise InputError(source, f"INT8 model refused: {SATURATING_KERNELS}; use the FP32 model "
                                 "(to measure the INT8 model's accuracy here: tools/check_accuracy.py "
                                 "--qdq-as-written)")
    return session


def _is_int8(session) -> bool:
    """True for the INT8 files calib/ writes (they carry their quantization record)."""
    return QUANTIZATION_KEY in session.get_modelmeta().custom_metadata_map


def open_onnxruntime_runner(model_path, intra_op_threads: int = 0):
    """Activate an ONNX model with ONNX Runtime and read the model specs it carries (metadata_props)."""
    from edge.model_file import ModelSpecs

    runner = OnnxRuntimeRunner(model_path, intra_op_threads=intra_op_threads).activate()
    try:
        specs = ModelSpecs.from_metadata(runner.custom_metadata(), source=model_path)
    except BaseException:
        runner.deactivate()
        raise
    return runner, specs
