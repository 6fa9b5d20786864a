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

Layout ``"cpu"``, for ONNX Runtime on the CPU: the same graph plus a Q/DQ pair
between each Conv and the Relu after it, with the scale of the Relu's output.
ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv
only when the Q follows the Conv directly, and ``Q(relu(y)) == relu(Q(y))`` for a
zero-point-0 int8 scale, so the extra pair changes no value: it is added only
where every use of the Relu output is quantized again with the same scale, and
both layouts compute the same numbers (tested).

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

from calib.ranges import INT8_MAX, ZERO_RANGE_AMAX, scale_from_amax
from edge.errors import ConfigError

LAYOUTS = ("tensorrt", "cpu")
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}
MIN_OPSET = 13
QUANTIZATION_KEY = "ct_edge.quantization"


@dataclass
class QdqModel:
    """A Q/DQ model and what was quantized."""

    model: onnx.ModelProto
    layout: str
    activation_scales: Dict[str, float]  # tensor -> scale of its Q/DQ pair
    weight_tensors: List[str]
    preactivation: List[str] = field(default_factory=list)  # Conv outputs with a Q/DQ (cpu layout)
    zero_range: List[str] = field(default_factory=list)  # tensors whose calibrated range was 0
    float_nodes: List[str] = field(default_factory=list)  # weighted nodes left in FP32, with the reason


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

    def qdq_pair(source, scale: np.ndarray, axis: Optional[int], suffix: str = "") -> "gs.Variable":
        base = source.name + suffix
        scale_c = gs.Constant(fresh(f"{base}_scale"), np.asarray(scale, np.float32))
        zero_c = gs.Constant(fresh(f"{base}_zero_point"), np.zeros(np.shape(scale), np.int8))
        attrs = {} if axis is None else {"axis": axis}
        q_out = gs.Variable(fresh(f"{base}_quantized"), np.int8, source.shape)
        dq_out = gs.Variable(fresh(f"{base}_dequantized"), np.float32, source.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", fresh(f"{base}_QuantizeLinear"), dict(attrs),
                                   [source, scale_c, zero_c], [q_out]))
        graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{base}_DequantizeLinear"), dict(attrs),
                                   [q_out, scale_c, zero_c], [dq_out]))
        return dq_out

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
            relu.inputs[0] = qdq_pair(y, np.float32(scale_from_amax(group_amax(r.name))), None, "_preact")
            preactivation.append(y.name)

    # One dedicated pair per consumer: ONNX Runtime fuses a DequantizeLinear into QLinearConv only when the
    # Conv is its sole reader, and TensorRT-oriented tools (onnxruntime's DedicatedQDQPair) do the same.
    scales: Dict[str, float] = {}
    for node, index in edges:
        t = node.inputs[index]
        scales.setdefault(t.name, scale_from_amax(group_amax(t.name)))
        node.inputs[index] = qdq_pair(t, np.float32(scales[t.name]), None)

    weights: List[str] = []
    for node in list(graph.nodes):
        if node.op not in WEIGHT_AXIS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue  # not a weighted layer, or one left in FP32 (listed in float_nodes)
        w = node.inputs[1]
        axis = WEIGHT_AXIS[node.op]
        values = np.asarray(w.values, np.float64)
        per_channel = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
        per_channel = np.where(per_channel > 0, per_channel, ZERO_RANGE_AMAX)
        node.inputs[1] = qdq_pair(w, (per_channel / INT8_MAX).astype(np.float32), axis)
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
    return QdqModel(out, layout, scales, sorted(set(weights)), preactivation, zero_range, float_nodes)


def write_model(path, model) -> None:
    """Write an ONNX model atomically (a half-written model never replaces a good one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
