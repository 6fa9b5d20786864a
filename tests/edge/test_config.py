"""The runtime config: TOML in, validated dataclasses out, every error names the file and the key."""

from pathlib import Path

import pytest

from edge.config import EdgeConfig, config_from_dict, describe_settings, load_config
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_no_file_content(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text("")
    config = load_config(path)
    assert config.scp.port == 11112 and config.scp.ae_title == "CT_EDGE"
    assert config.scp.allowed_calling_ae_titles == ()
    assert config.storage.state_dir == str(tmp_path / "state")  # relative to the config file
    assert config.outputs.dir == str(tmp_path / "results")
    assert config.ledger_path == tmp_path / "state" / "ledger.sqlite"
    assert config.source == str(path)


def test_values_are_read_and_paths_resolved(tmp_path):
    path = tmp_path / "conf" / "edge.toml"
    path.parent.mkdir()
    path.write_text("""
[scp]
ae_title = "LUNG_AI"
port = 104
allowed_calling_ae_titles = ["CT_ROOM_1", "CT_ROOM_2"]
[storage]
state_dir = "../var"
[pipeline]
series_idle_s = 4
[model]
path = "/opt/models/student.onnx"
""")
    config = load_config(path)
    assert config.scp.ae_title == "LUNG_AI" and config.scp.port == 104
    assert config.scp.allowed_calling_ae_titles == ("CT_ROOM_1", "CT_ROOM_2")
    assert config.storage.state_dir == str(tmp_path / "var")
    assert config.pipeline.series_idle_s == 4.0 and isinstance(config.pipeline.series_idle_s, float)
    assert config.model.path == "/opt/models/student.onnx"


@pytest.mark.parametrize("data,message", [
    ({"scp": {"port": "abc"}}, "edge.toml: scp.port must be an integer in 1..65535, got 'abc'"),
    ({"scp": {"port": 70000}}, "edge.toml: scp.port must be an integer in 1..65535, got 70000"),
    ({"scp": {"port": True}}, "edge.toml: scp.port must be an integer"),
    ({"scp": {"ae_title": "A" * 17}}, "edge.toml: scp.ae_title must be an AE title"),
    ({"scp": {"ae_title": "BAD\\AE"}}, "edge.toml: scp.ae_title must be an AE title"),
    ({"scp": {"allowed_calling_ae_titles": "CT1"}}, "edge.toml: scp.allowed_calling_ae_titles must be a list"),
    ({"scp": {"allowed_calling_ae_titles": ["OK", ""]}}, "edge.toml: scp.allowed_calling_ae_titles must be"),
    ({"scp": {"maximum_associations": 0}}, "edge.toml: scp.maximum_associations must be an integer in 1..64"),
    ({"scp": {"tls": {"enabled": "yes"}}}, "edge.toml: scp.tls.enabled must be true or false"),
    ({"scp": {"prot": 104}}, "edge.toml: unknown key scp.prot"),
    ({"scp": {"tls": {"cert": "x"}}}, "edge.toml: unknown key scp.tls.cert"),
    ({"scpp": {}}, "edge.toml: unknown key scpp"),
    ({"scp": 5}, "edge.toml: scp must be a table"),
    ({"pipeline": {"series_idle_s": 0}}, "edge.toml: pipeline.series_idle_s must be a number > 0"),
    ({"pipeline": {"series_idle_s": float("nan")}}, "edge.toml: pipeline.series_idle_s must be a number"),
    ({"pipeline": {"max_in_flight": -1}}, "edge.toml: pipeline.max_in_flight must be an integer"),
    ({"model": {"backend": "torch"}}, "edge.toml: model.backend must be one of 'onnxruntime', 'tensorrt'"),
    ({"model": {"path": 3}}, "edge.toml: model.path must be a path string"),
    ({"logging": {"level": "LOUD"}}, "edge.toml: logging.level must be one of"),
    ({"watch": {"enabled": True}}, "edge.toml: watch.folder is required when watch.enabled is true"),
    ({"scp": {"tls": {"enabled": True}}}, "edge.toml: scp.tls.certificate is required"),
    ({"scp": {"tls": {"enabled": True, "certificate": "/no/such.pem", "private_key": "/no/key.pem"}}},
     "edge.toml: scp.tls.certificate /no/such.pem is not a file"),
    ({"outputs": {"pacs": {"enabled": True}}}, "edge.toml: outputs.pacs.host is required"),
    ({"outputs": {"sr": False, "pacs": {"enabled": True, "host": "pacs"}}}, "edge.toml: outputs.pacs.enabled needs"),
    ({"metrics": {"port": 11112}}, "edge.toml: metrics.port 11112 is also scp.port"),
    ({"outputs": {"report_threshold": "auto"}}, 'edge.toml: outputs.report_threshold must be "model" or a number'),
    ({"outputs": {"report_threshold": 1.5}}, 'edge.toml: outputs.report_threshold must be "model" or a number'),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, source="edge.toml")
    assert str(e.value).startswith(message), str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scp\nport = 1")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad)


def test_model_path_falls_back_to_the_committed_model_or_says_what_is_missing(tmp_path, monkeypatch):
    import edge.config as config_module

    monkeypatch.setattr(config_module, "MODELS_DIR", tmp_path)
    config = config_from_dict({}, source="edge.toml")
    with pytest.raises(ConfigError, match="model.path is not set and no model is committed"):
        config.model_path()
    (tmp_path / "teacher.onnx").write_bytes(b"x")
    assert config.model_path() == tmp_path / "teacher.onnx"
    (tmp_path / "student.onnx").write_bytes(b"x")
    assert config.model_path() == tmp_path / "student.onnx"
    missing = config_from_dict({"model": {"path": str(tmp_path / "nope.onnx")}}, source="edge.toml")
    with pytest.raises(ConfigError, match="edge.toml: model.path .*nope.onnx is not a file"):
        missing.model_path()


def test_the_example_config_loads_and_mentions_every_key():
    example = ROOT / "edge.example.toml"
    config = load_config(example)
    assert isinstance(config, EdgeConfig)
    text = example.read_text()
    for key in describe_settings():
        section, _, name = key.rpartition(".")
        assert f"[{section}]" in text, section
        assert f"{name} =" in text or f"# {name} =" in text, key


def test_the_example_config_shows_the_defaults():
    example = ROOT / "edge.example.toml"
    assert load_config(example) == config_from_dict({}, source=str(example), base_dir=example.parent)


def test_report_threshold_is_the_models_unless_a_number_is_set():
    assert config_from_dict({}, source="edge.toml").outputs.report_threshold == "model"
    assert config_from_dict({"outputs": {"report_threshold": 0.3}}, source="edge.toml").outputs.report_threshold == 0.3
    assert config_from_dict({"outputs": {"report_threshold": 1}}, source="edge.toml").outputs.report_threshold == 1.0
