"""Function-preserving widening (toolchain/compression/widening.py) and tools/widen.py."""

import pytest
import torch

from compression_helpers import load_tool, tiny_specs, tiny_teacher
from edge.errors import ConfigError
from toolchain.compression.arch import CONV_WIDTHS_KEY, build_from_widths, conv_widths_of
from toolchain.compression.checkpoint import save_checkpoint
from toolchain.compression.widening import (
    check_widths,
    conv_input_sources,
    level_convs,
    parse_width_settings,
    widen,
    widen_checkpoint,
)
from toolchain.export.onnx_export import load_checkpoint

# a pruned-looking 3-level model: every conv its own width
PRUNED = {"in_channels": 3, "widths": [16, 24, 32], "head_width": 16, CONV_WIDTHS_KEY: {
    "stem.0": 8, "enc.0.block.0.0": 8, "enc.0.block.1.0": 8, "enc.1.block.0.0": 16, "enc.1.block.1.0": 24,
    "enc.2.block.0.0": 32, "enc.2.block.1.0": 24, "dec.0.block.0.0": 16, "dec.0.block.1.0": 16,
    "dec.1.block.0.0": 8, "dec.1.block.1.0": 8, "heatmap.conv.0": 8, "size.conv.0": 8, "offset.conv.0": 8}}
WIDER = {"stem.0": 16, "enc.0.block.0.0": 16, "enc.0.block.1.0": 24, "dec.1.block.0.0": 16, "dec.1.block.1.0": 16,
         "enc.2.block.1.0": 40, "heatmap.conv.0": 24, "size.conv.0": 16, "offset.conv.0": 16}


def pruned_model(seed=0, train=False):
    torch.manual_seed(seed)
    model = build_from_widths(PRUNED)
    with torch.no_grad():  # BatchNorm statistics a trained model would have, so eval mode is a real check
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.train(train)


def max_output_difference(a, b, x):
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a(x), b(x)))


@pytest.mark.parametrize("train", [False, True])
def test_widened_model_has_the_new_widths_and_the_same_outputs(train):
    model = pruned_model(train=train)
    wide = widen(model, WIDER)
    assert wide.training == train
    widths = conv_widths_of(wide)
    assert widths == dict(PRUNED[CONV_WIDTHS_KEY], **WIDER)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert max_output_difference(model, wide, x) < 1e-5
    # the narrow model is untouched
    assert conv_widths_of(model) == PRUNED[CONV_WIDTHS_KEY]


def test_the_input_map_matches_the_network_built_for_any_widths():
    model = widen(pruned_model(), WIDER)
    modules = dict(model.named_modules())
    widths = conv_widths_of(model)
    for name, sources in conv_input_sources(3).items():
        expected = sum(3 if s is None else widths[s] for s in sources)
        assert modules[name].in_channels == expected, name


def test_new_channels_learn():
    """Zero fan-out must not freeze the new channels: one step makes their outgoing weights non-zero."""
    model = pruned_model(train=True)
    wide = widen(model, {"stem.0": 16})
    reader = wide.enc[0].block[0][0]  # reads the stem's output
    assert torch.count_nonzero(reader.weight[:, 8:]) == 0
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    hm, size, off = wide(torch.rand(2, 3, 32, 32))
    (hm.mean() + size.mean() + off.mean()).backward()
    opt.step()
    assert torch.count_nonzero(reader.weight[:, 8:]) > 0


def test_seed_sets_the_new_weights():
    model = pruned_model()
    a, b, c = widen(model, WIDER, seed=1), widen(model, WIDER, seed=1), widen(model, WIDER, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])
    assert torch.equal(sa["stem.0.weight"][:8], sc["stem.0.weight"][:8])  # the old channels are the model's


@pytest.mark.parametrize("widths, message", [
    ({"stem.0": 4}, ">= that"),
    ({"stem.0": 16.0}, ">= that"),
    ({"stem.0": True}, ">= that"),
    ({"enc.7.block.0.0": 16}, "unknown conv"),
    ({"heatmap.out": 4}, "unknown conv"),
])
def test_bad_widths_are_rejected(widths, message):
    with pytest.raises(ConfigError, match=message):
        check_widths(pruned_model(), widths)


def test_level_convs():
    assert level_convs(3, 0) == ["stem.0", "enc.0.block.0.0", "enc.0.block.1.0", "dec.1.block.0.0",
                                 "dec.1.block.1.0"]
    assert level_convs(3, 1) == ["enc.1.block.0.0", "enc.1.block.1.0", "dec.0.block.0.0", "dec.0.block.1.0"]
    assert level_convs(3, 2) == ["enc.2.block.0.0", "enc.2.block.1.0"]  # the deepest level has no decoder conv
    model = build_from_widths(PRUNED)
    for level in range(3):  # every conv named for a level outputs at that level's resolution
        side = 32 // 2 ** (level + 1)
        seen = {}
        hooks = [dict(model.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o.shape[-1])) for n in level_convs(3, level)]
        model(torch.rand(1, 3, 32, 32))
        for h in hooks:
            h.remove()
        assert set(seen.values()) == {side}
    with pytest.raises(ConfigError, match="0..2"):
        level_convs(3, 3)


def test_parse_width_settings():
    assert parse_width_settings(["stem.0=16", " heatmap.conv.0 =32"]) == {"stem.0": 16, "heatmap.conv.0": 32}
    for bad in (["stem.0"], ["stem.0=x"], ["=8"]):
        with pytest.raises(ConfigError, match="NAME=CHANNELS"):
            parse_width_settings(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_width_settings(["stem.0=16", "stem.0=24"])


def test_widen_checkpoint_round_trip(tmp_path):
    model = pruned_model()
    src = save_checkpoint(tmp_path / "narrow.pt", model, tiny_specs(), {"name": "narrow"})
    widen_checkpoint(src, tmp_path / "wide.pt", {"stem.0": 16})
    wide, specs = load_checkpoint(tmp_path / "wide.pt")
    assert specs.card["widened_from"] == str(src) and specs.card["widened"] == {"stem.0": 16}
    assert specs.card["name"] == "narrow" and specs.preprocess == tiny_specs().preprocess
    assert conv_widths_of(wide)["stem.0"] == 16
    assert max_output_difference(model, wide, torch.rand(1, 3, 32, 32)) < 1e-5


def test_cli_widens_and_prints_the_cost(tmp_path, capsys):
    src = save_checkpoint(tmp_path / "narrow.pt", pruned_model(), tiny_specs(), {"name": "narrow"})
    teacher = save_checkpoint(tmp_path / "teacher.pt", tiny_teacher(widths=(16, 24, 32)).eval(), tiny_specs(),
                              {"name": "t"})
    tool = load_tool("widen")
    out = tmp_path / "wide.pt"
    assert tool.main(["--checkpoint", str(src), "--out", str(out), "--level", "0=16", "--heads", "24",
                      "--conv", "enc.1.block.0.0=24", "--teacher", str(teacher)]) == 0
    printed = capsys.readouterr().out
    assert f"widened checkpoint: {out}" in printed and "of the teacher: parameters" in printed
    widths = conv_widths_of(load_checkpoint(out)[0])
    assert [widths[n] for n in level_convs(3, 0)] == [16] * 5
    assert widths["heatmap.conv.0"] == widths["offset.conv.0"] == 24 and widths["enc.1.block.0.0"] == 24


@pytest.mark.parametrize("args, message", [
    ([], "nothing to widen"),
    (["--level", "0=16", "--conv", "stem.0=24"], "set twice"),
    (["--level", "a=16"], "integer level"),
    (["--level", "5=16"], "0..2"),
    (["--heads", "4"], ">= that"),
])
def test_cli_user_errors_exit_1(tmp_path, capsys, args, message):
    src = save_checkpoint(tmp_path / "narrow.pt", pruned_model(), tiny_specs(), {"name": "narrow"})
    tool = load_tool("widen")
    assert tool.main(["--checkpoint", str(src), "--out", str(tmp_path / "w.pt")] + args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.pt").exists()
