import numpy as np
import pytest

from edge.errors import ConfigError, InputError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.preprocess.cpu import CpuPreprocessor, assemble_input, iter_network_inputs
from edge.preprocess.reference import preprocess_frame_reference, stack_slices
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

FP32_TOL = 1e-5
THREE_WINDOWS = (WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"], WINDOW_PRESETS["bone"])


def make_frame(shape, dtype=np.int16, padding=None, slope=1.0, intercept=0.0, spacing=(0.7, 0.7), seed=0):
    """Random stored values spanning air..bone, so every window has clipped and unclipped pixels."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1100, 2400, shape)
    stored = np.round((hu - intercept) / slope)
    if padding is not None:  # a band of padding values in the corners
        stored[: shape[0] // 4, : shape[1] // 4] = padding[0]
        stored[-2:, -3:] = padding[1]
    rows, cols = shape
    return CTFrame(stored.astype(dtype), slope, intercept, SliceGeometry(rows, cols, spacing, (0.0, 0.0, 0.0)),
                   padding=padding)


CASES = {
    "downsize": ((512, 512), dict()),
    "upsize": ((64, 48), dict(out_height=200, out_width=150)),
    "non_square_odd": ((300, 203), dict(out_height=128, out_width=97)),
    "three_windows_normalized": ((256, 256), dict(windows=THREE_WINDOWS, out_height=96, out_width=96, mean=0.3,
                                                  std=0.25)),
    "physical_inside": ((256, 256), dict(pixel_size_mm=1.1, out_height=128, out_width=128)),
    "physical_outside": ((200, 160), dict(pixel_size_mm=2.0, out_height=96, out_width=80, windows=THREE_WINDOWS)),
    "physical_upsample": ((64, 64), dict(pixel_size_mm=0.3, out_height=160, out_width=160)),
}

STORAGE = {
    "int16_padding": dict(dtype=np.int16, padding=(-2000, -1900)),
    "uint16_rescaled": dict(dtype=np.uint16, slope=0.5, intercept=-1024.0, padding=(0, 0)),
    "uint16_no_padding": dict(dtype=np.uint16, intercept=-1024.0),
}


@pytest.mark.parametrize("storage", sorted(STORAGE))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, storage):
    shape, spec_kwargs = CASES[case]
    spec = PreprocessSpec(**spec_kwargs)
    frame = make_frame(shape, **STORAGE[storage])
    out = CpuPreprocessor(spec).preprocess_frame(frame)
    ref = preprocess_frame_reference(frame, spec)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_TOL)


def test_physical_mode_really_samples_outside_the_image():
    shape, spec_kwargs = CASES["physical_outside"]
    spec = PreprocessSpec(**spec_kwargs)
    frame = make_frame(shape)
    out = CpuPreprocessor(spec).preprocess_frame(frame)
    fill = preprocess_frame_reference(frame, spec)[:, 0, 0]
    assert np.all(out[:, 0, :] == fill[:, None].astype(np.float32))
    assert np.all(out[:, :, 0] == fill[:, None].astype(np.float32))


def test_writes_into_a_view_of_the_network_input_float32():
    spec = PreprocessSpec(windows=THREE_WINDOWS, slices=3, out_height=64, out_width=64)
    frame = make_frame((128, 128), padding=(-2000, -2000))
    network_input = np.full((1, spec.channels, 64, 64), 99.0, dtype=np.float32)
    view = network_input[0, 3:6]
    returned = CpuPreprocessor(spec).preprocess_frame(frame, out=view)
    assert np.shares_memory(returned, network_input)
    np.testing.assert_allclose(network_input[0, 3:6], preprocess_frame_reference(frame, spec), atol=FP32_TOL)
    assert np.all(network_input[0, :3] == 99.0) and np.all(network_input[0, 6:] == 99.0)


def test_float16_output():
    spec = PreprocessSpec(windows=THREE_WINDOWS, out_height=96, out_width=96, mean=0.3, std=0.25, dtype="float16")
    frame = make_frame((200, 160), dtype=np.uint16, intercept=-1024.0, padding=(0, 10))
    out = np.zeros((3, 96, 96), dtype=np.float16)
    CpuPreprocessor(spec).preprocess_frame(frame, out=out)
    ref = preprocess_frame_reference(frame, spec)
    # float16 keeps 11 significant bits: relative half-ulp 2**-11
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2**-11, atol=1e-4)


def test_identity_size_reproduces_the_window():
    spec = PreprocessSpec(out_height=50, out_width=40)
    frame = make_frame((50, 40))
    np.testing.assert_allclose(CpuPreprocessor(spec).preprocess_frame(frame), preprocess_frame_reference(frame, spec),
                               atol=FP32_TOL)


def test_rejects_unsupported_stored_dtype():
    frame = make_frame((16, 16))
    frame.pixels = frame.pixels.astype(np.int32)
    frame.source = "series/IM0001.dcm"
    with pytest.raises(InputError, match="IM0001.dcm.*int16 or uint16"):
        CpuPreprocessor(PreprocessSpec(out_height=8, out_width=8)).preprocess_frame(frame)


def test_rejects_out_of_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        CpuPreprocessor(PreprocessSpec(out_height=8, out_width=8)).preprocess_frame(
            make_frame((16, 16)), out=np.empty((1, 8, 9), np.float32))


def test_assemble_input_matches_reference_stack():
    spec = PreprocessSpec(windows=THREE_WINDOWS[:2], slices=3, out_height=32, out_width=32, dtype="float16")
    pre = CpuPreprocessor(spec)
    frames = [make_frame((64, 64), seed=s) for s in range(3)]
    x = assemble_input([pre.preprocess_frame(f) for f in frames], spec)
    ref = stack_slices([preprocess_frame_reference(f, spec) for f in frames], spec)
    assert x.shape == ref.shape == (1, 6, 32, 32) and x.dtype == np.float16
    np.testing.assert_allclose(x.astype(np.float64), ref.astype(np.float64), rtol=2**-10, atol=1e-3)
    with pytest.raises(ConfigError, match="slices"):
        assemble_input([pre.preprocess_frame(frames[0])], spec)


class CountingPreprocessor(CpuPreprocessor):
    def __init__(self, spec):
        super().__init__(spec)
        self.calls = 0

    def preprocess_frame(self, frame, out=None):
        self.calls += 1
        return super().preprocess_frame(frame, out)


@pytest.mark.parametrize("slices,n_frames", [(1, 3), (3, 5), (5, 3), (3, 1)])
def test_iter_network_inputs_preprocesses_each_frame_once(slices, n_frames):
    spec = PreprocessSpec(slices=slices, out_height=16, out_width=16)
    frames = [make_frame((32, 32), seed=s) for s in range(n_frames)]
    pre = CountingPreprocessor(spec)
    inputs = [x.copy() for x in iter_network_inputs(iter(frames), pre)]
    assert pre.calls == n_frames
    assert len(inputs) == n_frames
    planes = [preprocess_frame_reference(f, spec) for f in frames]
    half = slices // 2
    for center, x in enumerate(inputs):
        neighbours = [planes[min(max(center + k, 0), n_frames - 1)] for k in range(-half, half + 1)]
        np.testing.assert_allclose(x, stack_slices(neighbours, spec), atol=FP32_TOL)


def test_iter_network_inputs_of_no_frames_yields_nothing():
    assert list(iter_network_inputs([], CpuPreprocessor(PreprocessSpec(slices=3)))) == []
