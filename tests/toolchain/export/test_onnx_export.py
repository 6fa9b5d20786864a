import copy
import dataclasses
import importlib.util
import io
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from edge.decode.spec import DecodeSpec
from edge.errors import ConfigError, InputError
from edge.model_file import ModelSpecs, read_model_specs
from edge.preprocess.spec import PreprocessSpec
from toolchain.export.graph_cleanup import clean_graph, remove_identity
from toolchain.export.onnx_export import EXPORT_INFO_KEY, PRODUCER_NAME, export_onnx, load_checkpoint, summarize_graph
from toolchain.export.parity import ParityError, check_parity, network_inputs, require_parity, synthetic_series
from toolchain.models.centernet_unet import OUTPUT_NAMES, CenterNetUNet, ExportWrapper

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "tools" / "export_onnx.py"
SIZE = 64
ARCH = {"in_channels": 3, "widths": [8, 16], "head_width": 8}
NETWORK_OPS = {"Conv", "Relu", "MaxPool", "Resize", "Concat", "Sigmoid"}


def tiny_model(seed: int = 0) -> CenterNetUNet:
    """The tiny detector with non-trivial BatchNorm statistics, so that folding them matters."""
    torch.manual_seed(seed)
    model = CenterNetUNet(ARCH["in_channels"], ARCH["widths"], ARCH["head_width"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def tiny_specs(**preprocess) -> ModelSpecs:
    preprocess = dict(dict(out_height=SIZE, out_width=SIZE, slices=3), **preprocess)
    return ModelSpecs(PreprocessSpec(**preprocess), DecodeSpec(stride=2, score_threshold=0.25),
                      {"name": "tiny-detector", "version": "0.0.1", "training": {"epochs": 1}})


def save_checkpoint(path, model=None, specs=None, **overrides):
    model = model or tiny_model()
    specs = specs or tiny_specs()
    ckpt = {"arch": ARCH, "state_dict": model.state_dict(), "preprocess": specs.preprocess.to_dict(),
            "decode": specs.decode.to_dict(), "card": specs.card}
    ckpt.update(overrides)
    ckpt = {k: v for k, v in ckpt.items() if v is not None}
    torch.save(ckpt, path)
    return path


def ort_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(model_or_path, x):
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, specs = tiny_model(), tiny_specs()
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    proto = export_onnx(model, specs, path)
    return model, specs, path, proto


@pytest.fixture(scope="module")
def slices():
    """Network inputs made from a synthetic CT series by the runtime's CPU preprocessing."""
    return network_inputs(synthetic_series(n_slices=5, size=96, spacing_mm=3.5), tiny_specs().preprocess, count=3)


def test_exported_graph_passes_the_checker_and_holds_only_network_layers(exported):
    model, _, path, _ = exported
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    ops = Counter(n.op_type for n in loaded.graph.node)
    assert set(ops) <= NETWORK_OPS, ops
    assert ops["Conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert next(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # every conv owns its parameters (no initializer shared behind a removed Identity)
    conv_params = [name for n in loaded.graph.node if n.op_type == "Conv" for name in n.input[1:]]
    assert len(conv_params) == len(set(conv_params)) == 2 * ops["Conv"]


def test_interface_names_shapes_and_dtypes(exported):
    sess = ort_session(exported[2])
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("input", "tensor(float)", ["batch", 3, SIZE, SIZE])
    outs = {o.name: (o.type, o.shape) for o in sess.get_outputs()}
    half = SIZE // 2
    assert list(outs) == list(OUTPUT_NAMES)
    assert outs == {"heatmap": ("tensor(float)", ["batch", 1, half, half]),
                    "size": ("tensor(float)", ["batch", 1, half, half]),
                    "offset": ("tensor(float)", ["batch", 2, half, half])}


def test_dynamic_batch_gives_the_same_per_sample_results(exported, slices):
    together = run_onnx(exported[2], slices)
    for i in range(slices.shape[0]):
        alone = run_onnx(exported[2], slices[i:i + 1])
        for a, b in zip(alone, together):
            np.testing.assert_allclose(a[0], b[i], rtol=0, atol=1e-5)


def test_parity_with_pytorch_on_preprocessed_slices(exported, slices):
    model, _, path, _ = exported
    stats = check_parity(model, path, slices)
    assert list(stats.max_abs_diff) == list(OUTPUT_NAMES)
    assert stats.batch == slices.shape[0]
    assert stats.within(1e-4), stats.format()
    assert all(v > 0 for v in stats.max_abs_reference.values())
    require_parity(stats, path)


def test_parity_catches_a_model_that_differs(exported, slices):
    model, _, path, _ = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.size.out.bias += 1e-3
    stats = check_parity(changed, path, slices)
    assert not stats.within(1e-4)
    assert stats.worst[0] == "size" and stats.worst[1] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ParityError, match="size max abs diff"):
        require_parity(stats, path)


def test_specs_round_trip_through_the_model_file(exported):
    _, specs, path, proto = exported
    assert read_model_specs(path) == specs
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert EXPORT_INFO_KEY in meta and '"opset": 17' in meta[EXPORT_INFO_KEY]
    assert proto.producer_name == PRODUCER_NAME


def test_same_weights_give_the_same_bytes_and_train_mode_is_kept(exported, tmp_path):
    model, specs, path, _ = exported
    again = copy.deepcopy(model).train()
    export_onnx(again, specs, tmp_path / "again.onnx")
    assert again.training
    assert (tmp_path / "again.onnx").read_bytes() == path.read_bytes()
    other = export_onnx(tiny_model(seed=1), specs, tmp_path / "other.onnx")
    assert other.SerializeToString() != path.read_bytes()


def test_graph_summary_counts_ops_and_parameters(exported):
    model, _, path, proto = exported
    summary = summarize_graph(proto)
    assert summary.file_bytes == path.stat().st_size
    assert summary.op_counts["Conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    bn_params = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv_params = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters())
    # folded BN adds a bias to each bias-free conv; Resize scales are the only other initializer (4 floats)
    assert summary.parameters == conv_params + bn_params // 2 + 4
    assert "Conv x13" in summary.format()


def test_clean_graph_folds_batchnorm_left_by_the_exporter():
    wrapper = ExportWrapper(tiny_model()).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (torch.zeros(1, 3, SIZE, SIZE),), buffer, input_names=["input"], opset_version=17,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)
    raw = onnx.load_from_string(buffer.getvalue())
    assert Counter(n.op_type for n in raw.graph.node)["BatchNormalization"] == 10
    cleaned = clean_graph(raw)
    assert set(n.op_type for n in cleaned.graph.node) <= NETWORK_OPS
    x = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    for a, b in zip(run_onnx(raw, x), run_onnx(cleaned, x)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_remove_identity_bypasses_inner_and_output_identities():
    x = gs.Variable("x", np.float32, (1, 4))
    a, b, c, y = (gs.Variable(n, np.float32) for n in "abcy")
    kept = gs.Variable("kept", np.float32, (1, 4))
    nodes = [gs.Node("Relu", inputs=[x], outputs=[a]), gs.Node("Identity", inputs=[a], outputs=[b]),
             gs.Node("Neg", inputs=[b], outputs=[c]), gs.Node("Identity", inputs=[c], outputs=[y]),
             gs.Node("Identity", inputs=[x], outputs=[kept])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y, kept], opset=17)
    before = gs.export_onnx(graph.copy())
    assert remove_identity(graph) == 2
    graph.cleanup().toposort()
    after = gs.export_onnx(graph)
    assert sorted(n.op_type for n in after.graph.node) == ["Identity", "Neg", "Relu"]
    assert [o.name for o in after.graph.output] == ["y", "kept"]
    v = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    for want, got in zip(run_onnx(before, v), run_onnx(after, v)):
        np.testing.assert_array_equal(got, want)


def test_load_checkpoint_round_trip(tmp_path):
    model, specs = tiny_model(), tiny_specs()
    loaded, loaded_specs = load_checkpoint(save_checkpoint(tmp_path / "c.pt", model, specs))
    assert loaded_specs == specs
    assert not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("damage, message", [
    ("missing", "checkpoint not found"),
    ("garbage", "not a readable PyTorch checkpoint"),
    ("no_decode", "lacks key(s) decode"),
    ("bad_arch", "'arch' must be a dict"),
    ("wrong_widths", "does not match its 'arch'"),
    ("channels", "3 input channels but the preprocess spec makes 1"),
    ("bad_spec", "spec is invalid"),
])
def test_unusable_checkpoint_is_an_input_error_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "c.pt"
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif damage == "no_decode":
        save_checkpoint(path, decode=None)
    elif damage == "bad_arch":
        save_checkpoint(path, arch={"in_channels": 3})
    elif damage == "wrong_widths":
        save_checkpoint(path, arch=dict(ARCH, widths=[8, 24]))
    elif damage == "channels":
        save_checkpoint(path, preprocess=PreprocessSpec(out_height=SIZE, out_width=SIZE).to_dict())
    elif damage == "bad_spec":
        save_checkpoint(path, decode={"stride": 2, "colour": "red"})
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("opset, specs, message", [
    (16, tiny_specs(), "opset must be an integer >= 17"),
    (17, tiny_specs(out_height=62), "multiples of 4"),
    (17, ModelSpecs(tiny_specs().preprocess, DecodeSpec(stride=4)), "decode.stride is 4"),
    (17, tiny_specs(slices=1), "3 input channels"),
])
def test_export_rejects_settings_the_model_cannot_honour(tmp_path, opset, specs, message):
    with pytest.raises(ConfigError, match=message):
        export_onnx(tiny_model(), specs, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def write_dicom_series(folder: Path, n_slices: int = 4) -> Path:
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for k, frame in enumerate(synthetic_series(n_slices=n_slices, size=64, spacing_mm=5.0)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = frame.pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelPaddingValue = -2000
        ds.PixelSpacing = list(frame.geometry.pixel_spacing)
        ds.ImagePositionPatient = list(frame.geometry.position)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 2.5
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = frame.pixels.astype("<i2").tobytes()
        # reversed file order: the reader must sort slices by position
        ds.save_as(folder / f"{n_slices - k:03d}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM")
    return folder


def test_cli_end_to_end_on_a_dicom_series(tmp_path):
    ckpt = save_checkpoint(tmp_path / "tiny.pt")
    series = write_dicom_series(tmp_path / "series")
    out = tmp_path / "tiny.onnx"
    r = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(ckpt), "--out", str(out),
                        "--parity-series", str(series), "--parity-inputs", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Conv x13" in r.stdout and "parity on 2 input(s)" in r.stdout and str(series) in r.stdout
    assert read_model_specs(out) == tiny_specs()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series", "tiny.onnx", "tiny.pt"]


def load_cli():
    spec = importlib.util.spec_from_file_location("export_onnx_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(b"\x00" * 16)
    rc = load_cli().main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"error: {ckpt}: not a readable PyTorch checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_writes_nothing_when_parity_fails(tmp_path, capsys, monkeypatch):
    cli = load_cli()
    real_check = cli.check_parity

    def check_against_a_changed_model(model, path, inputs):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.heatmap.out.bias += 1.0
        return real_check(changed, path, inputs)

    monkeypatch.setattr(cli, "check_parity", check_against_a_changed_model)
    ckpt = save_checkpoint(tmp_path / "tiny.pt")
    rc = cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--parity-inputs", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "heatmap max abs diff" in err and "not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


def test_cli_embeds_a_given_decode_spec(tmp_path):
    ckpt = save_checkpoint(tmp_path / "tiny.pt")
    tuned = dataclasses.replace(tiny_specs().decode, min_z_span=0.7, max_elongation=1.5)
    (tmp_path / "decode.json").write_text(tuned.to_json())
    out = tmp_path / "m.onnx"
    rc = load_cli().main(["--checkpoint", str(ckpt), "--out", str(out), "--parity-inputs", "1",
                          "--decode", str(tmp_path / "decode.json")])
    assert rc == 0
    assert read_model_specs(out).decode == tuned
    assert read_model_specs(out).preprocess == tiny_specs().preprocess


def test_cli_bad_decode_spec_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "tiny.pt")
    (tmp_path / "decode.json").write_text('{"min_z_span": 3}')
    rc = load_cli().main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"),
                          "--decode", str(tmp_path / "decode.json")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert f"{tmp_path / 'decode.json'}" in err and "min_z_span" in err
    assert not (tmp_path / "m.onnx").exists()
