import json

import pytest

from edge.errors import ConfigError
from edge.update import device
from edge.update.device import DeviceProfile, detect_device


def test_tags_come_from_the_option_then_device_json_then_detection(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "tensorrt_version", lambda: None)
    assert detect_device(tmp_path) == DeviceProfile(detect_device(tmp_path).runtime_version, ("cpu",), None)
    (tmp_path / "device.json").write_text(json.dumps({"hardware": ["jetson-orin", "sm_87"]}))
    assert detect_device(tmp_path).hardware == ("jetson-orin", "sm_87")
    assert detect_device(tmp_path, hardware=["cpu"]).hardware == ("cpu",)
    monkeypatch.setattr(device, "tensorrt_version", lambda: "10.3.0.30")
    monkeypatch.setattr(device, "_gpu_tags", lambda: ("sm_90",))
    d = detect_device(tmp_path / "elsewhere", runtime_version="0.2.0")
    assert d == DeviceProfile("0.2.0", ("sm_90",), "10.3.0.30") and d.backend == "tensorrt"
    assert d.to_dict()["backend"] == "tensorrt"


@pytest.mark.parametrize("text", ['{"hardware": "orin"}', '{"hardware": ["Orin!"]}', "{", "[]"])
def test_bad_device_json_is_a_config_error(tmp_path, text):
    (tmp_path / "device.json").write_text(text)
    with pytest.raises(ConfigError, match="device.json"):
        detect_device(tmp_path)


def test_bad_hardware_option_is_a_config_error():
    with pytest.raises(ConfigError, match="--hardware 'Jetson Orin'"):
        detect_device(None, hardware=["Jetson Orin"])
