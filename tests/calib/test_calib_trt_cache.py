import struct

import pytest

from calib.trt_cache import (
    format_calibration_cache,
    hex_to_scale,
    parse_calibration_cache,
    read_calibration_cache,
    scale_to_hex,
    trt_version_number,
    write_calibration_cache,
)
from edge.errors import ConfigError, InputError

# A calibration table as TensorRT writes it (TensorRT's sampleINT8 documentation, MNIST CalibrationTable).
SAMPLE_INT8_TABLE = """TRT-7000-EntropyCalibration2
data: 3c008912
conv1: 3c88edfc
pool1: 3c88edfc
conv2: 3ddc858b
pool2: 3ddc858b
ip1: 3db6bd6e
ip2: 3e691968
prob: 3c010a14
"""


def test_reads_a_table_written_by_tensorrt_and_writes_it_back_identically():
    cache = parse_calibration_cache(SAMPLE_INT8_TABLE)
    assert cache.version == 7000 and cache.algorithm == "EntropyCalibration2"
    assert list(cache.scales) == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
    # the MNIST input lies in [0, 1]: its scale is amax / 127 with amax ~1
    assert cache.scales["data"] * 127 == pytest.approx(0.9963, abs=1e-4)
    assert cache.scales["data"] == struct.unpack(">f", bytes.fromhex("3c008912"))[0]
    assert format_calibration_cache(cache.scales, "7.0.0") == SAMPLE_INT8_TABLE


@pytest.mark.parametrize("version, number", [("8.5.2", 8502), ("8.5.3.1", 8503), ("8.6", 8600),
                                             ("10.3.0", 100300), ("10.13", 101300), ("11.0.1", 110001)])
def test_version_number_is_nv_tensorrt_version(version, number):
    assert trt_version_number(version) == number


def test_header_scales_and_round_trip(tmp_path):
    scales = {"input": 1.0 / 127, "/model/stem/Conv_output_0": 0.0123, "heatmap": 2.5e-9}
    path = write_calibration_cache(tmp_path / "c.cache", scales, "10.3.0")
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    assert "input: 3c010204" in text  # 1/127 as big-endian float32 bits
    back = read_calibration_cache(path)
    assert back.version == 100300
    for name, scale in scales.items():
        assert back.scales[name] == struct.unpack(">f", struct.pack(">f", scale))[0]
    assert hex_to_scale(scale_to_hex(0.5)) == 0.5 and scale_to_hex(0.5) == "3f000000"


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_refuses_scales_tensorrt_would_reject(scale):
    with pytest.raises(ConfigError, match="positive and finite"):
        format_calibration_cache({"t": scale}, "8.5.2")


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="TRT-<version>-<algorithm>"):
        parse_calibration_cache("EntropyCalibration2\nx: 3c000000\n", "c.cache")
    with pytest.raises(InputError, match="line 3"):
        parse_calibration_cache("TRT-8502-EntropyCalibration2\nx: 3c000000\ny 3c000000\n", "c.cache")
    with pytest.raises(InputError, match="cannot read"):
        read_calibration_cache(tmp_path / "missing.cache")
    with pytest.raises(ConfigError, match="MAJOR.MINOR"):
        trt_version_number("ten")
