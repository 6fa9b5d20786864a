"""onnx-graphsurgeon passes that leave only the layers the detector is made of.

The TorchScript exporter folds eval-mode BatchNorm into the preceding conv, but
deduplicates identical initializers behind ``Identity`` nodes (an untrained
model's folded biases are all equal) and names them ``onnx::Conv_<n>``. After
:func:`clean_graph` the graph holds Conv / Relu / MaxPool / Resize / Concat /
Sigmoid only, every conv owns its parameters, and each parameter is named after
its node, which keeps TensorRT layer reports and per-layer tooling readable.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ANONYMOUS_PREFIX = "onnx::"
_CONV_PARAMETER_ROLES = {1: "weight", 2: "bias"}


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def remove_identity(graph: gs.Graph) -> int:
    """Bypass Identity nodes (consumers read the Identity's input); return how many were removed.

    An Identity that produces a graph output is removed by letting its input's
    producer write the output tensor directly; one between a graph input and a
    graph output (or a constant and an output) must stay and is left alone.
    """
    removed = 0
    for node in [n for n in graph.nodes if n.op == "Identity" and n.inputs and n.outputs]:
        src, dst = node.inputs[0], node.outputs[0]
        if dst not in graph.outputs:
            node.inputs.clear()
            node.outputs.clear()
            for consumer in list(dst.outputs):
                _replace_input(consumer, dst, src)
        elif isinstance(src, gs.Variable) and src.inputs and src not in graph.outputs and src not in graph.inputs:
            producer = src.inputs[0]
            node.inputs.clear()
            node.outputs.clear()
            for consumer in list(src.outputs):
                _replace_input(consumer, src, dst)
            producer.outputs[producer.outputs.index(src)] = dst
        else:
            continue
        removed += 1
    return removed


def _foldable_conv(bn: gs.Node):
    """The Conv feeding ``bn`` when it can absorb it (constant parameters, no other reader), else None."""
    x = bn.inputs[0]
    if len(bn.outputs) != 1 or len(x.inputs) != 1 or len(x.outputs) != 1 or not isinstance(x, gs.Variable):
        return None
    conv = x.inputs[0]
    if conv.op != "Conv" or not all(isinstance(t, gs.Constant) for t in conv.inputs[1:] + bn.inputs[1:5]):
        return None
    return conv


def fold_batchnorm_into_conv(graph: gs.Graph) -> int:
    """Fold inference-mode BatchNormalization into the preceding Conv; return how many were folded.

    ``y = (conv(x) + b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``
    becomes a conv with weights ``w * s`` (per output channel) and bias
    ``(b - mean) * s + beta``, computed in float64. BatchNorm nodes that follow
    anything else stay (ONNX Runtime and TensorRT run them as they are).
    """
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = _foldable_conv(bn)
        if conv is None:
            continue
        gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        weight = conv.inputs[1].values
        bias = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(weight.shape[0], weight.dtype)
        new_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        new_bias = (bias.astype(np.float64) - mean) * scale + beta
        # New constants: the originals may be shared with other nodes.
        conv.inputs[1] = gs.Constant(f"{conv.name}.weight", new_weight.astype(weight.dtype))
        bias_tensor = gs.Constant(f"{conv.name}.bias", new_bias.astype(weight.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_tensor
        else:
            conv.inputs.append(bias_tensor)
        y = bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        conv.outputs[0] = y
        folded += 1
    return folded


def name_parameters(graph: gs.Graph) -> int:
    """Give exporter-named (``onnx::...``) constants with a single reader a name after it; return the count."""
    renamed = 0
    taken = {t.name for t in graph.tensors().values()}
    for node in graph.nodes:
        if not node.name:
            continue
        for i, t in enumerate(node.inputs):
            if not (isinstance(t, gs.Constant) and t.name.startswith(ANONYMOUS_PREFIX) and len(t.outputs) == 1):
                continue
            role = _CONV_PARAMETER_ROLES.get(i, f"input{i}") if node.op == "Conv" else f"input{i}"
            name = f"{node.name}.{role}"
            if name in taken:
                continue
            taken.add(name)
            t.name = name
            renamed += 1
    return renamed


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, remove Identity, fold BatchNorm, drop dead nodes, sort, name parameters.

    The opset and IR version of ``model`` are kept; metadata is not carried over.
    """
    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=False).cleanup(remove_unused_graph_inputs=False)
    remove_identity(graph)
    fold_batchnorm_into_conv(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    name_parameters(graph)
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    return cleaned
