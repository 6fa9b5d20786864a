"""Explicit quantization: FP32 ONNX + activation ranges -> a Q/DQ ONNX that TensorRT accepts.

Quantization scheme (TensorRT's): symmetric int8, zero point 0, per-channel
weight scales on the output-channel axis (0 for Conv, 1 for ConvTranspose) from
each channel's largest ``|w|``, per-tensor activation scales ``amax / 127``
from :mod:`calib.ranges`; opset >= 13 (per-axis Q/DQ). Weights stay FP32 behind
a QuantizeLinear -> DequantizeLinear pair (TensorRT quantizes them at build time;
TensorRT 8.5 does not take pre-quantized INT8 initializers), biases stay FP32.

Placement, layout ``"tensorrt"`` (NVIDIA's Q/DQ placement recommendations):
Q/DQ on both inputs of every Conv (activation and weight), on both inputs of
residual Adds, on every Concat input; nothing on the outputs of weighted layers
and nothing on graph outputs (the heads' heatmap, size and offset stay FP32).
Tensors joined by Concat, MaxPool or nearest Resize share one scale (the largest
of their ranges), so TensorRT runs those layers in INT8 without requantizing.

Layout ``"cpu"``, for ONNX Runtime on the CPU: the same scales, four changes.
(1) Tensors that cannot be negative (Relu outputs, and MaxPool, nearest Resize,
Concat and Add of such tensors) are quantized as uint8 with zero point 0: the
u8 x s8 integer kernels are ONNX Runtime's fast path on x86. (2) Weights are stored
quantized (int8 initializers, a file a quarter of the size). (3) A Relu after a
Conv whose output is quantized again everywhere with one scale is replaced by a
uint8 Q/DQ pair on the Conv's output: the pair's clamp at 0 is the Relu, and
ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv
only when the Q follows the Conv directly, so the whole network runs as integer
kernels with no float Relu and no requantization in between (about 11% less
time than int8 pairs around a float Relu). (4) Sibling detection heads are
fused into one convolution, equalized so that each head keeps its own
resolution (:mod:`calib.head_fusion`; about 10% less time). With
scale ``amax / 127`` a uint8 value equals the int8 one wherever the tensor stays
within its calibrated range, so both layouts compute the same numbers there
(tested); above it the CPU layout saturates at twice the range instead of at it.

Why onnx-graphsurgeon and not ``onnxruntime.quantization.quantize_static``:
with TensorRT's settings (QDQ format, symmetric QInt8, per-channel) ONNX
Runtime's quantizer still quantizes biases to INT32 DequantizeLinear (which
TensorRT's ONNX parser does not import), puts Q/DQ on the outputs of every
quantized node including the graph outputs, and places Concat inputs' scales
independently; switching those off takes several version-dependent
``extra_options`` and still leaves the Concat scale sharing and the exact
TensorRT/CPU layout pair to post-processing. The whole placement here is
about 150 lines over a graph that holds Conv, Relu, MaxPool, Resize, Concat,
Add and Sigmoid only, and the ranges come from our own collector.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from calib.head_fusion import fuse_parallel_heads
from calib.ranges import INT8_MAX, ZERO_RANGE_AMAX, scale_from_amax
from edge.errors import ConfigError
from edge.model_file import QUANTIZATION_KEY

LAYOUTS = ("tensorrt", "cpu")
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}
MIN_OPSET = 13


@dataclass
class QdqModel:
    """A Q/DQ model and what was quantized."""

    model: onnx.ModelProto
    layout: str
    activation_scales: Dict[str, float]  # tensor -> scale of its Q/DQ pair
    weight_tensors: List[str]
    preactivation: List[str] = field(default_factory=list)  # Conv outputs whose uint8 pair replaced the Relu (cpu)
    zero_range: List[str] = field(default_factory=list)  # tensors whose calibrated range was 0
    float_nodes: List[str] = field(default_factory=list)  # weighted nodes left in FP32, with the reason
    fused_heads: List[str] = field(default_factory=list)  # head convolutions fused into one (cpu layout)


class _Groups:
    """Union-find over tensor names."""

    def __init__(self):
        self.parent: Dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def members(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return out


def _is_variable(t) -> bool:
    return isinstance(t, gs.Variable)


def _is_nearest_resize(node) -> bool:
    mode = node.attrs.get("mode", "nearest")
    return node.op == "Resize" and (mode.decode() if isinstance(mode, bytes) else mode) == "nearest"


def _scale_sharing_pairs(graph) -> List[Tuple[str, str]]:
    pairs = []
    for node in graph.nodes:
        if node.op == "Concat":
            inputs = [t for t in node.inputs if _is_variable(t)]
            pairs += [(t.name, node.outputs[0].name) for t in inputs]
        elif node.op == "MaxPool" or _is_nearest_resize(node):
            if node.inputs and _is_variable(node.inputs[0]):
                pairs.append((node.inputs[0].name, node.outputs[0].name))
    return pairs


def _non_negative_tensors(graph) -> set:
    """Names of tensors that cannot be negative: Relu outputs, and MaxPool / nearest Resize (of their data
    input), Concat and Add (of every input) applied to such tensors. ``graph`` must be in topological order."""
    out = set()
    for node in graph.nodes:
        if node.op == "Relu":
            out.update(t.name for t in node.outputs)
        elif node.op == "MaxPool" or _is_nearest_resize(node):
            if node.inputs and node.inputs[0].name in out:
                out.add(node.outputs[0].name)  # MaxPool's optional Indices output is not a quantized tensor
        elif node.op in ("Concat", "Add"):
            inputs = [t for t in node.inputs if _is_variable(t)]
            if inputs and all(t.name in out for t in inputs) and all(
                    not isinstance(t, gs.Constant) or np.all(t.values >= 0) for t in node.inputs):
                out.update(t.name for t in node.outputs)
    return out


def _activation_edges(graph) -> Tuple[List[Tuple[object, int]], List[str]]:
    """(node, input index) of every activation input TensorRT's placement quantizes; weighted nodes left FP32."""
    edges, float_nodes = [], []
    for node in graph.nodes:
        if node.op in WEIGHT_AXIS:
            if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
                float_nodes.append(f"{node.name} ({node.op}: weight is not a constant)")
                continue
            if _is_variable(node.inputs[0]):
                edges.append((node, 0))
        elif node.op in ("Add", "Concat"):
            edges += [(node, i) for i, t in enumerate(node.inputs) if _is_variable(t)]
    return edges, float_nodes


def quantize_model(model, amax: Mapping[str, float], layout: str = "tensorrt",
                   info: Optional[dict] = None) -> QdqModel:
    """Insert Q/DQ pairs into a copy of ``model`` with scales from ``amax`` (``{tensor: range}``).

    ``info`` (JSON-serialisable) is stored with the layout as the
    ``ct_edge.quantization`` metadata entry; the model's other metadata (its
    preprocessing and decode specs) is kept. Raises ConfigError for an opset
    below 13 or a quantized tensor without a range.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"Q/DQ layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    graph = gs.import_onnx(model)
    if graph.opset < MIN_OPSET:
        raise ConfigError(f"the model's opset is {graph.opset}; per-channel Q/DQ needs opset >= {MIN_OPSET}: "
                          "re-export it with tools/export_onnx.py")
    fused_heads: List[str] = []
    if layout == "cpu":
        fusion = fuse_parallel_heads(model, amax)
        if fusion.fused:
            model, amax, fused_heads = fusion.model, fusion.amax, fusion.fused
            graph = gs.import_onnx(model)
    graph.toposort()
    non_negative = _non_negative_tensors(graph) if layout == "cpu" else set()
    groups = _Groups()
    for a, b in _scale_sharing_pairs(graph):
        groups.union(a, b)
    members = groups.members()

    def group_amax(name: str) -> float:
        names = members.get(groups.find(name), [name])
        known = [float(amax[n]) for n in names if n in amax]
        if not known:
            raise ConfigError(f"no calibrated range for tensor {name!r}: were the ranges computed for this model?")
        return max(known)

    edges, float_nodes = _activation_edges(graph)
    planned = {(id(node), index) for node, index in edges}
    taken = set(graph.tensors())
    zero_range = sorted({n for n, v in amax.items() if not v > 0})

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def qdq_pair(source, scale: np.ndarray, axis: Optional[int], suffix: str = "", unsigned: bool = False,
                 out: Optional["gs.Variable"] = None) -> "gs.Variable":
        """Q -> DQ of ``source``; the DQ writes ``out`` when given (a tensor whose producer was removed)."""
        base = source.name + suffix
        dtype = np.uint8 if unsigned else np.int8
        scale_c = gs.Constant(fresh(f"{base}_scale"), np.asarray(scale, np.float32))
        zero_c = gs.Constant(fresh(f"{base}_zero_point"), np.zeros(np.shape(scale), dtype))
        attrs = {} if axis is None else {"axis": axis}
        q_out = gs.Variable(fresh(f"{base}_quantized"), dtype, source.shape)
        dq_out = out if out is not None else gs.Variable(fresh(f"{base}_dequantized"), np.float32, source.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", fresh(f"{base}_QuantizeLinear"), dict(attrs),
                                   [source, scale_c, zero_c], [q_out]))
        graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{base}_DequantizeLinear"), dict(attrs),
                                   [q_out, scale_c, zero_c], [dq_out]))
        return dq_out

    def dequantized_constant(weight, scale: np.ndarray, axis: int) -> "gs.Variable":
        """DQ of ``weight`` quantized here (int8 initializer): what ONNX Runtime folds a Q of a constant into."""
        shape = [1] * weight.values.ndim
        shape[axis] = -1
        values = np.clip(np.rint(np.asarray(weight.values, np.float32) / scale.reshape(shape)), -INT8_MAX, INT8_MAX)
        q = gs.Constant(fresh(f"{weight.name}_quantized"), values.astype(np.int8))
        scale_c = gs.Constant(fresh(f"{weight.name}_scale"), scale)
        zero_c = gs.Constant(fresh(f"{weight.name}_zero_point"), np.zeros(scale.shape, np.int8))
        out = gs.Variable(fresh(f"{weight.name}_dequantized"), np.float32, weight.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{weight.name}_DequantizeLinear"), {"axis": axis},
                                   [q, scale_c, zero_c], [out]))
        return out

    graph_outputs = {t.name for t in graph.outputs}

    def requantized_exactly(tensor) -> bool:
        """Every use of ``tensor`` is a quantized input with the scale of its group (directly or through
        MaxPool / nearest Resize, which keep the group's scale)."""
        if tensor.name in graph_outputs or not tensor.outputs:
            return False
        for consumer in tensor.outputs:
            indices = [i for i, t in enumerate(consumer.inputs) if t is tensor]
            if all((id(consumer), i) in planned for i in indices):
                continue
            if (consumer.op == "MaxPool" or _is_nearest_resize(consumer)) and indices == [0]:
                if requantized_exactly(consumer.outputs[0]):
                    continue
            return False
        return True

    preactivation = []
    if layout == "cpu":
        for node in list(graph.nodes):
            if node.op != "Conv" or (id(node), 0) not in planned or not isinstance(node.inputs[1], gs.Constant):
                continue
            y = node.outputs[0]
            if y.name in graph_outputs or len(y.outputs) != 1 or y.outputs[0].op != "Relu":
                continue
            relu = y.outputs[0]
            r = relu.outputs[0]
            if not requantized_exactly(r):
                continue
            relu.inputs.clear()  # the unsigned pair's clamp at 0 is the Relu; cleanup removes the node
            relu.outputs.clear()
            qdq_pair(y, np.float32(scale_from_amax(group_amax(r.name))), None, "_preact", unsigned=True, out=r)
            preactivation.append(y.name)

    # One dedicated pair per consumer: ONNX Runtime fuses a DequantizeLinear into QLinearConv only when the
    # Conv is its sole reader, and TensorRT-oriented tools (onnxruntime's DedicatedQDQPair) do the same.
    scales: Dict[str, float] = {}
    for node, index in edges:
        t = node.inputs[index]
        scales.setdefault(t.name, scale_from_amax(group_amax(t.name)))
        node.inputs[index] = qdq_pair(t, np.float32(scales[t.name]), None, unsigned=t.name in non_negative)

    weights: List[str] = []
    for node in list(graph.nodes):
        if node.op not in WEIGHT_AXIS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue  # not a weighted layer, or one left in FP32 (listed in float_nodes)
        w = node.inputs[1]
        axis = WEIGHT_AXIS[node.op]
        values = np.asarray(w.values, np.float64)
        per_channel = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
        per_channel = np.where(per_channel > 0, per_channel, ZERO_RANGE_AMAX)
        scale = (per_channel / INT8_MAX).astype(np.float32)
        node.inputs[1] = qdq_pair(w, scale, axis) if layout == "tensorrt" else dequantized_constant(w, scale, axis)
        weights.append(w.name)

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    for prop in model.metadata_props:
        if prop.key != QUANTIZATION_KEY:
            out.metadata_props.add(key=prop.key, value=prop.value)
    meta = dict(info or {}, layout=layout, activation_tensors=len(scales), weight_tensors=len(set(weights)))
    out.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(meta, sort_keys=True))
    onnx.checker.check_model(out)
    return QdqModel(out, layout, scales, sorted(set(weights)), preactivation, zero_range, float_nodes, fused_heads)


def write_model(path, model) -> None:
    """Write an ONNX model atomically (a half-written model never replaces a good one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
