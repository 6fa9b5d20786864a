"""PyTorch detector -> one self-describing ONNX model file.

The graph is the deployment graph (:class:`ExportWrapper`: sigmoid on the
heatmap) with input ``input`` (N, C, H, W) float32, outputs ``heatmap``,
``size``, ``offset``, a dynamic batch axis and H, W fixed by the preprocess
spec. The preprocess spec, decode spec and model card travel as
``metadata_props`` (:mod:`edge.model_file`), so the runtime needs only this file.

Exporter: the classic TorchScript one (``dynamo=False``). The torch.export-based
exporter needs ``onnxscript``, which the toolchain does not depend on, and gives
nothing here: the network is static apart from the batch axis. Same weights and
versions give the same bytes (names come from the module tree, metadata is sorted).
"""

import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import onnx
import torch

from edge.decode.spec import DecodeSpec
from edge.errors import ConfigError, InputError
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec
from toolchain.export.graph_cleanup import clean_graph
from toolchain.models.centernet_unet import OUTPUT_NAMES, OUTPUT_STRIDE, CenterNetUNet, ExportWrapper, build_model

DEFAULT_OPSET = 17
MIN_OPSET = 17
INPUT_NAME = "input"
BATCH_DIM = "batch"
PRODUCER_NAME = "ct-edge-export"
EXPORT_INFO_KEY = "ct_edge.export"
CHECKPOINT_KEYS = ("arch", "state_dict", "preprocess", "decode")  # "card" is optional
ARCH_KEYS = ("in_channels", "widths", "head_width")
FORBIDDEN_OPS = ("Identity", "BatchNormalization")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ct-edge")
    except PackageNotFoundError:
        return "0+unknown"


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many unrelated types (pickle, zip, EOF, runtime) for bad files
        raise InputError(path, f"not a readable PyTorch checkpoint: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(ckpt, dict):
        keys = ", ".join(CHECKPOINT_KEYS)
        raise InputError(path, f"checkpoint must be a dict with keys {keys}, got {type(ckpt).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise InputError(path, f"checkpoint lacks key(s) {', '.join(missing)}")
    arch = ckpt["arch"]
    if not isinstance(arch, dict) or any(k not in arch for k in ARCH_KEYS):
        raise InputError(path, f"checkpoint 'arch' must be a dict with keys {', '.join(ARCH_KEYS)}")
    return ckpt


def _specs_from_checkpoint(ckpt: dict, path: Path) -> ModelSpecs:
    try:
        preprocess = PreprocessSpec.from_dict(ckpt["preprocess"])
        decode = DecodeSpec.from_dict(ckpt["decode"])
    except (ConfigError, TypeError) as e:
        raise InputError(path, f"checkpoint spec is invalid: {e}") from None
    card = ckpt.get("card", {})
    if not isinstance(card, dict):
        raise InputError(path, f"checkpoint 'card' must be a dict, got {type(card).__name__}")
    try:
        json.dumps(card)
    except (TypeError, ValueError) as e:
        raise InputError(path, f"checkpoint 'card' is not JSON-serialisable: {e}") from None
    return ModelSpecs(preprocess, decode, card)


def load_checkpoint(path) -> Tuple[CenterNetUNet, ModelSpecs]:
    """The model (eval mode, CPU) and its specs from a training checkpoint; InputError naming the file if unusable."""
    path = Path(path)
    return model_from_checkpoint(_read_checkpoint(path), path)


def model_from_checkpoint(ckpt: dict, path: Path) -> Tuple[CenterNetUNet, ModelSpecs]:
    """:func:`load_checkpoint` for a checkpoint already read (by ``_read_checkpoint``) from ``path``."""
    specs = _specs_from_checkpoint(ckpt, path)
    try:
        model = build_model(ckpt["arch"])
    except (TypeError, ValueError, IndexError) as e:
        raise InputError(path, f"checkpoint 'arch' is invalid: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise InputError(path, f"checkpoint 'state_dict' does not match its 'arch': {str(e)[:300]}") from None
    if model.in_channels != specs.preprocess.channels:
        raise InputError(
            path,
            f"model takes {model.in_channels} input channels but the preprocess spec makes "
            f"{specs.preprocess.channels} (slices x windows)",
        )
    return model.eval(), specs


def _check_export_settings(model: torch.nn.Module, specs: ModelSpecs, opset: int) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    if specs.decode.stride != OUTPUT_STRIDE:
        raise ConfigError(
            f"decode.stride is {specs.decode.stride} but the model's outputs are at stride {OUTPUT_STRIDE}"
        )
    spec = specs.preprocess
    in_channels = getattr(model, "in_channels", None)
    if in_channels is not None and in_channels != spec.channels:
        raise ConfigError(f"model takes {in_channels} input channels but the preprocess spec makes {spec.channels}")
    widths = getattr(model, "widths", None)
    if widths is not None:
        multiple = OUTPUT_STRIDE * 2 ** (len(widths) - 1)
        if spec.out_height % multiple or spec.out_width % multiple:
            raise ConfigError(
                f"preprocess.out_height/out_width ({spec.out_height}x{spec.out_width}) must be multiples of "
                f"{multiple} for a model with {len(widths)} levels"
            )


def _torch_to_onnx(wrapper: torch.nn.Module, spec: PreprocessSpec, opset: int) -> onnx.ModelProto:
    import io

    device = next(wrapper.parameters()).device
    example = torch.zeros(1, spec.channels, spec.out_height, spec.out_width, dtype=torch.float32, device=device)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (module docstring); its deprecation notices are noise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_axes={name: {0: BATCH_DIM} for name in (INPUT_NAME,) + OUTPUT_NAMES},
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _static_shape(value_info) -> Tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims)


def _check_graph(model: onnx.ModelProto, specs: ModelSpecs) -> onnx.ModelProto:
    """Checker, strict shape inference and the interface the runtime relies on; returns the inferred model."""
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    left = sorted({n.op_type for n in model.graph.node} & set(FORBIDDEN_OPS))
    if left:
        raise RuntimeError(f"graph clean-up left {', '.join(left)} nodes")
    spec = specs.preprocess
    out_hw = (spec.out_height // OUTPUT_STRIDE, spec.out_width // OUTPUT_STRIDE)
    expected = {INPUT_NAME: (BATCH_DIM, spec.channels, spec.out_height, spec.out_width)}
    expected.update({name: (BATCH_DIM, c) + out_hw for name, c in zip(OUTPUT_NAMES, (1, 1, 2))})
    actual = {v.name: _static_shape(v) for v in list(model.graph.input) + list(model.graph.output)}
    if actual != expected:
        raise RuntimeError(f"exported interface {actual} differs from the expected {expected}")
    return model


def _export_info(opset: int) -> str:
    return json.dumps({"exporter": "torch.onnx (TorchScript)", "opset": opset, "torch": torch.__version__,
                       "onnx": onnx.__version__}, sort_keys=True)


def _write_atomically(model: onnx.ModelProto, out_path: Path) -> None:
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(out_path, f"cannot write the model: {e.strerror or e}") from None


def export_onnx(model: torch.nn.Module, specs: ModelSpecs, out_path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (its training outputs; the sigmoid is added here) with ``specs`` embedded.

    The graph is cleaned (:func:`~toolchain.export.graph_cleanup.clean_graph`),
    checked (full checker, strict shape inference, interface) and written
    atomically to ``out_path``. The model's train/eval mode is restored afterwards.
    Returns the written model.
    """
    _check_export_settings(model, specs, opset)
    was_training = model.training
    wrapper = ExportWrapper(model).eval()
    try:
        exported = _torch_to_onnx(wrapper, specs.preprocess, opset)
    finally:
        model.train(was_training)
    cleaned = _check_graph(clean_graph(exported), specs)
    cleaned.graph.name = str(specs.card.get("name") or "centernet_unet")
    cleaned.producer_name = PRODUCER_NAME
    cleaned.producer_version = _package_version()
    cleaned.doc_string = "CT lung-nodule detector; specs in metadata_props (see edge.model_file)"
    del cleaned.metadata_props[:]
    metadata = dict(specs.to_metadata(), **{EXPORT_INFO_KEY: _export_info(opset)})
    onnx.helper.set_model_props(cleaned, dict(sorted(metadata.items())))
    _write_atomically(cleaned, Path(out_path))
    return cleaned


@dataclass(frozen=True)
class GraphSummary:
    """What an exported graph is made of."""

    op_counts: Dict[str, int]
    parameters: int
    file_bytes: int
    opset: int
    inputs: Dict[str, Tuple]
    outputs: Dict[str, Tuple]

    def format(self) -> str:
        def io_line(kind, name, shape):
            return f"  {kind:<6} {name:<8} [{', '.join(str(d) for d in shape)}]"

        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"  opset {self.opset}, {sum(self.op_counts.values())} nodes ({ops})",
                 f"  {self.parameters:,} parameters, {self.file_bytes / 1024:.1f} KiB"]
        lines += [io_line("input", n, s) for n, s in self.inputs.items()]
        lines += [io_line("output", n, s) for n, s in self.outputs.items()]
        return "\n".join(lines)


def summarize_graph(model: onnx.ModelProto) -> GraphSummary:
    """Node count by op type, parameter count, serialized size, opset and interface of ``model``."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphSummary(
        op_counts=dict(Counter(n.op_type for n in model.graph.node)),
        parameters=sum(math.prod(t.dims) for t in model.graph.initializer),
        file_bytes=model.ByteSize(),
        opset=opset,
        inputs={v.name: _static_shape(v) for v in model.graph.input},
        outputs={v.name: _static_shape(v) for v in model.graph.output},
    )

