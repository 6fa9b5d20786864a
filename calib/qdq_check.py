"""Checks any Q/DQ ONNX model against TensorRT's explicit-quantization rules, naming each offending node.

Errors are what TensorRT's ONNX parser or builder rejects; warnings are what it
accepts but runs slower or less accurately than intended. Sources:

[EQ]   TensorRT Developer Guide, "Explicit Quantization" (sections "ONNX Support",
       "Q/DQ Layer-Placement Recommendations", "Q/DQ Limitations"),
       https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
[WQ]   TensorRT Developer Guide, "Working with Quantized Types": symmetric
       quantization only, signed INT8, per-tensor activations, per-channel weights.
[PARSER] onnx-tensorrt QuantizeLinear/DequantizeLinear importers: "TRT only supports
       symmetric quantization - zeroPt must be all zeros"; scales must be build-time
       constants; DequantizeLinear takes INT8 (FP8, INT4) inputs, not INT32.

=======  ========  ==============================================================  ========
rule     severity  what                                                            source
=======  ========  ==============================================================  ========
QDQ001   error     default-domain opset >= 13 (per-axis Q/DQ)                       [EQ]
QDQ002   error     zero point given, constant, all zeros                            [PARSER]
QDQ003   error     quantized type is int8 (zero point dtype)                        [WQ]
QDQ004   error     scale constant float, every value positive and finite           [PARSER]
QDQ005   error     per-channel scales only on constant weights, on the output-     [WQ][EQ]
                   channel axis (0 Conv/Gemm-weights, 1 ConvTranspose); activation
                   scales have one element
QDQ006   error     pairs well formed: a Q feeds only DQs with its scale, zero       [EQ]
                   point and axis; a DQ reads a Q or a constant int8 tensor
QDQ007   warning   weighted layer with only its activation or only its weight      [EQ] placement:
                   quantized (TensorRT then runs it in floating point)             "quantize all inputs of weighted ops"
QDQ008   warning   Add with one input quantized and the other not (residual        [EQ] placement:
                   input not quantized: no INT8 element-wise fusion)              "quantize the residual input"
QDQ009   warning   Concat inputs quantized inconsistently (some not, or unequal    [EQ] limitations:
                   scales: TensorRT cannot run it as an INT8 copy)                 rewrites need equal scales
QDQ010   warning   Q/DQ on a graph output (the heads' heatmap / size / offset      [EQ] placement: "don't quantize
                   lose resolution where the decoder reads peaks)                  outputs of weighted operations"
=======  ========  ==============================================================  ========
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from edge.errors import InputError

MIN_OPSET = 13
WEIGHTED_OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": None}
QUANTIZED_DTYPES = {np.dtype(np.int8)}


@dataclass(frozen=True)
class Issue:
    rule: str
    severity: str  # "error" or "warning"
    node: str
    message: str

    def format(self) -> str:
        return f"{self.severity} {self.rule} {self.node}: {self.message}"


@dataclass
class QdqReport:
    issues: List[Issue] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    weighted_nodes: int = 0
    quantized_weighted_nodes: int = 0

    @property
    def errors(self) -> List[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> List[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        verdict = "passes" if self.ok else "FAILS"
        return (f"Q/DQ check {verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s); "
                f"{self.quantize_nodes} Q / {self.dequantize_nodes} DQ nodes, "
                f"{self.quantized_weighted_nodes}/{self.weighted_nodes} weighted layers in INT8")

    def format(self) -> str:
        return "\n".join([self.summary()] + ["  " + i.format() for i in self.issues])


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.constants: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> Optional[np.ndarray]:
        return self.constants.get(name)


def _name(node) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _axis(node) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return int(attr.i)
    return 1  # ONNX default


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _dequantized_source(g: _Graph, tensor: str):
    """The DequantizeLinear producing ``tensor``, or None."""
    node = g.producer.get(tensor)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _is_weight_dq(g: _Graph, dq) -> bool:
    """DQ of a constant: directly (pre-quantized int8) or through a Q of a constant."""
    src = dq.input[0]
    if g.const(src) is not None:
        return True
    q = g.producer.get(src)
    return q is not None and q.op_type == "QuantizeLinear" and g.const(q.input[0]) is not None


def check_qdq(model) -> QdqReport:
    """All rule violations of ``model`` (an onnx.ModelProto), in graph order."""
    g = _Graph(model)
    report = QdqReport()
    add = report.issues.append

    opset = _opset(model)
    if opset < MIN_OPSET:
        add(Issue("QDQ001", "error", "<model>", f"opset {opset} < {MIN_OPSET}: per-axis Q/DQ needs opset 13"))

    qdq_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    report.quantize_nodes = sum(n.op_type == "QuantizeLinear" for n in qdq_nodes)
    report.dequantize_nodes = len(qdq_nodes) - report.quantize_nodes
    weight_axis_of = _weight_axes(g)

    for node in qdq_nodes:
        name = _name(node)
        scale = g.const(node.input[1]) if len(node.input) > 1 else None
        zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) < 3 or not node.input[2]:
            add(Issue("QDQ002", "error", name,
                      "no zero point: ONNX then quantizes to uint8; give an int8 zero point of 0"))
        elif zero is None:
            add(Issue("QDQ002", "error", name, f"zero point {node.input[2]!r} is not a constant"))
        else:
            if zero.dtype not in QUANTIZED_DTYPES:
                add(Issue("QDQ003", "error", name, f"quantized type is {zero.dtype}, TensorRT needs int8"))
            if np.any(zero != 0):
                add(Issue("QDQ002", "error", name, "zero point is not all zeros (TensorRT is symmetric only)"))
        if scale is None:
            add(Issue("QDQ004", "error", name, f"scale {node.input[1]!r} is not a constant"))
            continue
        if scale.dtype.kind != "f" or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            add(Issue("QDQ004", "error", name, "scale must be float, positive and finite "
                                               f"(min {float(np.min(scale)) if scale.size else math.nan:.3g})"))
        if node.op_type == "DequantizeLinear":
            _check_dequantize_source(g, node, name, add)
        _check_granularity(g, node, name, scale, weight_axis_of, add)
        if node.op_type == "QuantizeLinear":
            _check_pairs(g, node, name, scale, zero, add)
        if any(o in g.outputs for o in node.output):
            add(Issue("QDQ010", "warning", name,
                      f"Q/DQ on graph output {node.output[0]!r}: keep the heads' outputs FP32"))

    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1:
            _check_weighted(g, node, report)
        elif node.op_type == "Add":
            _check_add(g, node, add)
        elif node.op_type == "Concat":
            _check_concat(g, node, add)
    return report


def _weight_axes(g: _Graph) -> Dict[str, Optional[int]]:
    """DQ output name -> the output-channel axis its weighted consumer needs (None: any per-tensor)."""
    axes = {}
    for tensor, consumers in g.consumers.items():
        for c in consumers:
            if c.op_type in WEIGHTED_OPS and len(c.input) > 1 and c.input[1] == tensor:
                axis = WEIGHTED_OPS[c.op_type]
                if c.op_type == "Gemm":
                    trans_b = next((a.i for a in c.attribute if a.name == "transB"), 0)
                    axis = 0 if trans_b else 1
                elif c.op_type == "MatMul":
                    axis = -1
                axes[tensor] = axis
    return axes


def _check_dequantize_source(g: _Graph, dq, name: str, add) -> None:
    src = dq.input[0]
    const = g.const(src)
    if const is not None:
        if const.dtype not in QUANTIZED_DTYPES:
            add(Issue("QDQ006", "error", name, f"dequantizes a constant of type {const.dtype} (e.g. an INT32 bias); "
                                               "TensorRT imports INT8 DequantizeLinear inputs only: keep biases FP32"))
        return
    producer = g.producer.get(src)
    if producer is None or producer.op_type != "QuantizeLinear":
        what = "a graph input" if producer is None else f"{producer.op_type} {_name(producer)}"
        add(Issue("QDQ006", "error", name, f"input comes from {what}, not from a QuantizeLinear"))


def _check_granularity(g: _Graph, node, name: str, scale: np.ndarray, weight_axis_of, add) -> None:
    if scale.size <= 1:
        return
    is_weight = (node.op_type == "QuantizeLinear" and g.const(node.input[0]) is not None) or (
        node.op_type == "DequantizeLinear" and _is_weight_dq(g, node))
    if not is_weight:
        add(Issue("QDQ005", "error", name, f"per-channel scale ({scale.size} values) on an activation; "
                                           "TensorRT quantizes activations per tensor"))
        return
    dq_outputs = [node.output[0]] if node.op_type == "DequantizeLinear" else [
        c.output[0] for c in g.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
    src = node.input[0] if node.op_type == "QuantizeLinear" else None
    shape = g.const(src).shape if src is not None else None
    axis = _axis(node)
    for out in dq_outputs:
        want = weight_axis_of.get(out)
        if want is None:
            continue
        rank = len(shape) if shape is not None else None
        if rank is not None:
            axis_n, want_n = axis % rank, want % rank
        else:
            axis_n, want_n = axis, want
        if axis_n != want_n:
            add(Issue("QDQ005", "error", name,
                      f"per-channel axis {axis}, the weighted layer's output-channel axis is {want}"))


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    return a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b)


def _check_pairs(g: _Graph, q, name: str, scale, zero, add) -> None:
    for c in g.consumers.get(q.output[0], []):
        if c.op_type != "DequantizeLinear":
            add(Issue("QDQ006", "error", name, f"output read by {c.op_type} {_name(c)}, not by a DequantizeLinear"))
            continue
        c_scale = g.const(c.input[1]) if len(c.input) > 1 else None
        c_zero = g.const(c.input[2]) if len(c.input) > 2 and c.input[2] else None
        if not _same(scale, c_scale) or (zero is not None and not _same(zero, c_zero)):
            add(Issue("QDQ006", "error", _name(c), f"scale or zero point differs from its QuantizeLinear {name}"))
        elif scale.size > 1 and _axis(c) != _axis(q):
            add(Issue("QDQ006", "error", _name(c), f"axis {_axis(c)} differs from its QuantizeLinear's {_axis(q)}"))


def _check_weighted(g: _Graph, node, report: QdqReport) -> None:
    weight = node.input[1]
    weight_dq = _dequantized_source(g, weight)
    is_weight = g.const(weight) is not None or (weight_dq is not None and _is_weight_dq(g, weight_dq))
    if not is_weight:
        return  # a MatMul of two activations: not a weighted layer
    report.weighted_nodes += 1
    act_q = _dequantized_source(g, node.input[0]) is not None
    w_q = weight_dq is not None
    if act_q and w_q:
        report.quantized_weighted_nodes += 1
    elif act_q != w_q:
        which = "activation" if act_q else "weight"
        report.issues.append(Issue("QDQ007", "warning", _name(node),
                                   f"only its {which} is quantized: TensorRT runs it in floating point"))


def _variable_inputs(g: _Graph, node) -> List[str]:
    return [i for i in node.input if i and g.const(i) is None]


def _check_add(g: _Graph, node, add) -> None:
    inputs = _variable_inputs(g, node)
    quantized = [_dequantized_source(g, i) is not None for i in inputs]
    if len(inputs) == 2 and any(quantized) and not all(quantized):
        missing = inputs[quantized.index(False)]
        add(Issue("QDQ008", "warning", _name(node), f"input {missing!r} is not quantized while the other is: "
                                                    "quantize both inputs of a residual Add"))


def _check_concat(g: _Graph, node, add) -> None:
    inputs = _variable_inputs(g, node)
    dqs = [_dequantized_source(g, i) for i in inputs]
    if not any(dqs):
        return
    if not all(dqs):
        missing = [i for i, d in zip(inputs, dqs) if d is None]
        add(Issue("QDQ009", "warning", _name(node),
                  f"input(s) {', '.join(map(repr, missing))} not quantized while others are"))
        return
    scales = [g.const(d.input[1]) for d in dqs]
    if any(s is None for s in scales) or any(not _same(scales[0], s) for s in scales[1:]):
        add(Issue("QDQ009", "warning", _name(node), "inputs have different scales: TensorRT must requantize them"))


def check_qdq_file(path) -> QdqReport:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))
    except (OSError, ValueError, DecodeError) as e:
        raise InputError(path, f"not a readable ONNX model: {e}") from None
    return check_qdq(model)
