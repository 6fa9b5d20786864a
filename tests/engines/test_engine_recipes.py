import json

import pytest

from engines.recipe import RECIPE_DIR, list_recipes, load_all, load_recipe, recipe_from_dict
from edge.errors import ConfigError

SHIPPED = ["orin-jp6", "orin-jp6-dla", "workstation-trt10", "workstation-trt11", "xavier-jp5", "xavier-jp5-dla"]


def base(**changes):
    d = json.loads((RECIPE_DIR / "orin-jp6.json").read_text())
    d.update(changes)
    return d


def test_shipped_recipes_load_and_fit_their_targets():
    recipes = load_all()
    assert list_recipes() == SHIPPED and list(recipes) == SHIPPED
    assert recipes["orin-jp6"].tensorrt_version[:2] == (10, 3)
    assert recipes["xavier-jp5"].tensorrt_version[:2] == (8, 5)
    assert recipes["xavier-jp5"].builder_optimization_level is None  # arrived in 8.6
    for name in ("orin-jp6-dla", "xavier-jp5-dla"):
        r = recipes[name]
        assert r.device == "dla" and r.gpu_fallback and r.int8_mode == "implicit" and r.dla_core == 0
        assert r.batch.min == r.batch.opt == r.batch.max and "fp32" not in r.precisions
    trt11 = recipes["workstation-trt11"]
    assert trt11.strongly_typed and trt11.int8_mode == "explicit" and "fp16" not in trt11.precisions


@pytest.mark.parametrize("changes, key", [
    ({"tensorrt": "ten"}, "tensorrt"),
    ({"tensorrt": "8.4"}, "tensorrt"),
    ({"precisions": ["int4"]}, "precisions"),
    ({"int8_mode": "magic"}, "int8_mode"),
    ({"batch": {"min": 4, "opt": 2, "max": 8}}, "batch"),
    ({"batch": {"min": 1, "max": 8}}, "batch"),
    ({"workspace_mib": 0}, "workspace_mib"),
    ({"builder_optimization_level": 7}, "builder_optimization_level"),
    ({"tensorrt": "8.5.2", "builder_optimization_level": 3}, "builder_optimization_level"),
    ({"tensorrt": "8.5.2", "builder_optimization_level": None, "version_compatible": True}, "version_compatible"),
    ({"tensorrt": "11.0", "strongly_typed": False}, "strongly_typed"),
    ({"strongly_typed": True}, "precisions"),  # strongly typed: no FP16 flag
    ({"strongly_typed": True, "precisions": ["int8"], "int8_mode": "implicit"}, "int8_mode"),
    ({"device": "dla", "dla_core": 0, "precisions": ["int8", "fp16"], "int8_mode": "implicit"}, "batch"),
    ({"device": "dla", "dla_core": 0, "batch": {"min": 1, "opt": 1, "max": 1}, "int8_mode": "implicit"}, "precisions"),
    ({"device": "dla", "dla_core": None, "precisions": ["fp16"], "batch": {"min": 1, "opt": 1, "max": 1}}, "dla_core"),
    ({"dla_core": 1}, "dla_core"),
    ({"hardware_compatibility": "everything"}, "hardware_compatibility"),
    ({"fp16_fallback": "yes"}, "fp16_fallback"),
])
def test_each_bad_setting_is_named(changes, key):
    with pytest.raises(ConfigError, match=f"r.json: {key}:"):
        recipe_from_dict(base(**changes), "r.json")


def test_unknown_missing_keys_and_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        recipe_from_dict(base(fp8=True), "r.json")
    d = base()
    del d["batch"]
    with pytest.raises(ConfigError, match="missing key"):
        recipe_from_dict(d, "r.json")
    with pytest.raises(ConfigError, match=r"unknown target 'nano' \(known: orin-jp6"):
        load_recipe("nano")
    (tmp_path / "other.json").write_text(json.dumps(base()))
    with pytest.raises(ConfigError, match="must match"):
        load_recipe(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        load_recipe(tmp_path / "broken.json")


def test_command_line_overrides_are_validated_not_rewritten():
    orin = load_recipe("orin-jp6")
    assert orin.with_overrides(workspace_mib=512, dla_core=None).workspace_mib == 512
    assert orin.with_overrides(version_compatible=True).version_compatible
    dla = load_recipe("orin-jp6-dla")
    assert dla.with_overrides(dla_core=1).dla_core == 1
    with pytest.raises(ConfigError, match="--dla-core: target orin-jp6 builds for the GPU; choose a DLA target"):
        orin.with_overrides(dla_core=0)
    with pytest.raises(ConfigError, match="version_compatible: needs TensorRT >= 8.6"):
        load_recipe("xavier-jp5").with_overrides(version_compatible=True)
    with pytest.raises(ConfigError, match="builder_optimization_level"):
        orin.with_overrides(builder_optimization_level=9)
