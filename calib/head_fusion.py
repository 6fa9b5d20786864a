"""Horizontal fusion of parallel detection heads, for the CPU Q/DQ layout.

A CenterNet-style detector ends in sibling heads that read one feature map::

    x -> Conv3x3_b -> Relu -> Conv1x1_b -> out_b        for b = heatmap, size, offset

ONNX Runtime runs each small convolution on its own (the input is read once per
head); TensorRT fuses such siblings itself. :func:`fuse_parallel_heads` rewrites
them into one wide convolution, one block-diagonal 1x1 convolution and a Split::

    x -> Conv3x3 (all heads' filters) -> Relu -> Conv1x1 (block-diagonal) -> Split -> out_b

Equal in exact arithmetic. One per-tensor INT8 scale now covers every head's
features, so each head is first *equalized* (cross-layer equalization, Nagel et al.
2019): head ``b``'s 3x3 filters and bias are multiplied by ``k_b = A / amax_b``
(``A``: the largest head range) and its 1x1 weights divided by ``k_b``, exact
because ``relu(k z) = k relu(z)`` for ``k > 0``. Every head then spans the full
range, and the fused model quantizes each head's features to the same integers as
the unfused one (up to float rounding).
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

FUSED_PREFIX = "/fused_heads"


@dataclass
class HeadFusion:
    """The rewritten model, its ranges (with the new tensors') and what was fused."""

    model: onnx.ModelProto
    amax: Dict[str, float]
    fused: List[str]  # the 3x3 head convolutions that became one


@dataclass
class _Head:
    conv: "gs.Node"
    relu: "gs.Node"
    out: "gs.Node"


def _conv_key(node) -> Optional[tuple]:
    """What two sibling convolutions must share to be fused (None: not fusable)."""
    if node.op != "Conv" or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
        return None
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in node.attrs.items()}
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    shape = node.inputs[1].values.shape
    return (node.inputs[0].name, shape[1:], tuple(sorted((k, str(v)) for k, v in attrs.items())))


def _head(conv, graph_outputs) -> Optional[_Head]:
    """``conv -> Relu -> Conv 1x1`` with no other reader of the intermediate tensors, else None."""
    y = conv.outputs[0]
    if y.name in graph_outputs or len(y.outputs) != 1 or y.outputs[0].op != "Relu":
        return None
    relu = y.outputs[0]
    r = relu.outputs[0]
    if r.name in graph_outputs or len(r.outputs) != 1:
        return None
    out = r.outputs[0]
    key = _conv_key(out)
    if key is None or out.inputs[0] is not r or out.inputs[1].values.shape[2:] != (1, 1):
        return None
    if any(v not in (1, [1, 1], (1, 1)) for k, v in out.attrs.items() if k in ("strides", "dilations")):
        return None
    if any(p != 0 for p in out.attrs.get("pads", [0])):
        return None
    return _Head(conv, relu, out)


def _bias(node) -> np.ndarray:
    if len(node.inputs) > 2:
        return np.asarray(node.inputs[2].values, np.float64)
    return np.zeros(node.inputs[1].values.shape[0], np.float64)


def fuse_parallel_heads(model: onnx.ModelProto, amax: Mapping[str, float]) -> HeadFusion:
    """Fuse every group of >= 2 sibling heads (see the module docstring); the model unchanged when none.

    ``amax`` must hold the range of each head's Relu output (the equalization uses them).
    """
    graph = gs.import_onnx(model)
    graph_outputs = {t.name for t in graph.outputs}
    groups: Dict[tuple, List[_Head]] = {}
    for node in graph.nodes:
        key = _conv_key(node)
        head = _head(node, graph_outputs) if key is not None else None
        if head is not None and head.relu.outputs[0].name in amax:
            groups.setdefault(key, []).append(head)
    out_amax = dict(amax)
    fused: List[str] = []
    for index, heads in enumerate(g for g in groups.values() if len(g) >= 2):
        fused += [h.conv.name for h in heads]
        _fuse(graph, heads, out_amax, f"{FUSED_PREFIX}_{index}")
    if not fused:
        return HeadFusion(model, out_amax, [])
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(out)
    return HeadFusion(out, out_amax, fused)


def _fuse(graph, heads: List[_Head], amax: Dict[str, float], prefix: str) -> None:
    ranges = [float(amax[h.relu.outputs[0].name]) for h in heads]
    top = max(ranges)
    gains = [top / r if r > 0 else 1.0 for r in ranges]  # a dead head (range 0) stays as it is
    weights = np.concatenate([np.asarray(h.conv.inputs[1].values, np.float64) * k for h, k in zip(heads, gains)])
    bias = np.concatenate([_bias(h.conv) * k for h, k in zip(heads, gains)])
    widths = [h.conv.inputs[1].values.shape[0] for h in heads]
    outs = [h.out.inputs[1].values.shape[0] for h in heads]
    out_weights = np.zeros((sum(outs), sum(widths), 1, 1), np.float64)
    row = col = 0
    for h, k, w, n in zip(heads, gains, widths, outs):
        out_weights[row:row + n, col:col + w] = np.asarray(h.out.inputs[1].values, np.float64) / k
        row, col = row + n, col + w
    out_bias = np.concatenate([_bias(h.out) for h in heads])

    x = heads[0].conv.inputs[0]
    y = gs.Variable(f"{prefix}/Conv_output_0", np.float32)
    r = gs.Variable(f"{prefix}/Relu_output_0", np.float32)
    z = gs.Variable(f"{prefix}/out/Conv_output_0", np.float32)
    graph.nodes += [
        gs.Node("Conv", f"{prefix}/Conv", dict(heads[0].conv.attrs),
                [x, gs.Constant(f"{prefix}.weight", weights.astype(np.float32)),
                 gs.Constant(f"{prefix}.bias", bias.astype(np.float32))], [y]),
        gs.Node("Relu", f"{prefix}/Relu", {}, [y], [r]),
        gs.Node("Conv", f"{prefix}/out/Conv", dict(heads[0].out.attrs),
                [r, gs.Constant(f"{prefix}.out.weight", out_weights.astype(np.float32)),
                 gs.Constant(f"{prefix}.out.bias", out_bias.astype(np.float32))], [z]),
    ]
    results = [h.out.outputs[0] for h in heads]
    for h in heads:
        for node in (h.conv, h.relu, h.out):
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes.append(gs.Node("Split", f"{prefix}/Split", {"axis": 1},
                               [z, gs.Constant(f"{prefix}.split", np.asarray(outs, np.int64))], results))
    amax[y.name] = amax[r.name] = top
