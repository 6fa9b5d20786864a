"""GPU slice pipeline: layout arithmetic, launch plans and slot scheduling on the CPU; the real
pipeline (pycuda + the fused kernel) where a CUDA GPU is present.

The CPU tests check offsets, strides and ordering only. The scheduling test
drives :class:`DoubleBufferedSchedule` with recording callbacks: it checks the
order of host and GPU steps, not CUDA or TensorRT behaviour.
"""

import importlib.util

import numpy as np
import pytest

from edge.errors import ConfigError, MissingDependencyError
from edge.frame import CTFrame
from edge.geometry import SliceGeometry
from edge.gpu.cuda_context import DeviceProperties, is_jetson
from edge.gpu.mapped_buffers import MAPPED, PINNED, HostDeviceBuffer, align_up, choose_host_memory
from edge.gpu.pipeline import (
    BindingLayout,
    DoubleBufferedSchedule,
    launch_params,
    plan_launches,
    stack_source_indices,
)
from edge.preprocess.reference import preprocess_frame_reference
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec

HAVE_PYCUDA = importlib.util.find_spec("pycuda") is not None
SPEC = PreprocessSpec(windows=(WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"]), slices=3,
                      out_height=12, out_width=10)


def props(integrated: bool, can_map: bool = True) -> DeviceProperties:
    return DeviceProperties.from_attributes(
        0, "Orin" if integrated else "NVIDIA H100", (8, 7) if integrated else (9, 0), 1 << 34,
        {"INTEGRATED": int(integrated), "CAN_MAP_HOST_MEMORY": int(can_map), "MULTIPROCESSOR_COUNT": 16,
         "UNIFIED_ADDRESSING": 1})


def frames(n, rows=20, cols=16, intercept=-1024.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 2500, (rows, cols)).astype(np.uint16)
        out.append(CTFrame(pixels, 1.0, intercept, SliceGeometry(rows, cols, (0.7, 0.7), (0.0, 0.0, float(i))),
                           padding=(0, 0)))
    return out


# -- host memory choice and sizes


def test_zero_copy_on_integrated_gpus_pinned_copy_on_discrete():
    assert choose_host_memory(props(integrated=True)) == MAPPED
    assert choose_host_memory(props(integrated=False)) == PINNED
    assert choose_host_memory(props(integrated=False), "mapped") == MAPPED  # explicit request is honoured
    assert choose_host_memory(props(integrated=True), "pinned") == PINNED
    assert choose_host_memory(props(integrated=True, can_map=False)) == PINNED
    with pytest.raises(ConfigError, match="cannot map host memory"):
        choose_host_memory(props(integrated=True, can_map=False), "mapped")
    with pytest.raises(ConfigError, match="gpu.host_memory"):
        choose_host_memory(props(integrated=True), "unified")


def test_align_up():
    assert [align_up(n) for n in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]
    assert align_up(5, 4) == 8
    with pytest.raises(ValueError):
        align_up(5, 3)


def test_is_jetson_reads_release_file_or_device_tree(tmp_path):
    release, compatible = tmp_path / "nv_tegra_release", tmp_path / "compatible"
    assert not is_jetson(release, compatible)
    compatible.write_bytes(b"nvidia,p3737-0000+p3701-0000\x00nvidia,tegra234\x00")
    assert is_jetson(release, compatible)
    compatible.write_bytes(b"raspberrypi,4-model-b\x00brcm,bcm2711\x00")
    assert not is_jetson(release, compatible)
    release.write_text("# R36 (release), REVISION: 3.0\n")
    assert is_jetson(release, compatible)


@pytest.mark.skipif(HAVE_PYCUDA, reason="pycuda is installed: the missing-dependency message cannot be shown")
def test_gpu_buffers_without_pycuda_say_what_is_missing():
    with pytest.raises(MissingDependencyError, match="pycuda"):
        HostDeviceBuffer((4,), np.int16, PINNED)


# -- binding layout and launch plans


def test_plane_offsets_match_numpy_strides():
    layout = BindingLayout.from_spec(SPEC, max_batch=4, dtype="float16")
    binding = np.zeros(layout.shape(), layout.dtype)
    assert layout.nbytes() == binding.nbytes and layout.nbytes(2) == binding[:2].nbytes
    base = binding.ctypes.data
    for b in range(4):
        for s in range(SPEC.slices):
            assert layout.plane_byte_offset(b, s) == binding[b, s * 2].ctypes.data - base
    with pytest.raises(ValueError):
        layout.plane_byte_offset(4, 0)
    with pytest.raises(ValueError):
        layout.channel_offset(3)


@pytest.mark.parametrize("n, first, batch", [(1, 0, 1), (5, 0, 5), (9, 3, 4), (9, 7, 2), (2, 1, 1)])
@pytest.mark.parametrize("slices", [1, 3, 5])
def test_frame_run_clamps_like_the_cpu_detector(n, first, batch, slices):
    run = stack_source_indices(n, first, batch, slices)
    half = slices // 2
    assert len(run) == batch + slices - 1
    for b in range(batch):
        for s in range(slices):
            assert run[b + s] == min(max(first + b + s - half, 0), n - 1)  # edge-repeat as edge/detector.py


def emulate_launches(layout, launches, run_frames, spec):
    """Write reference planes where each launch's parameters say the kernel writes them."""
    out = np.full(layout.nbytes() // layout.dtype.itemsize, np.nan, np.float64)
    frame_bytes = run_frames[0].pixels.nbytes
    itemsize = layout.dtype.itemsize
    for launch in launches:
        assert launch.src_byte_offset % frame_bytes == 0 and launch.dst_byte_offset % itemsize == 0
        params = launch_params(run_frames[launch.run_position], spec, layout)[0]
        for z in range(launch.n_frames):
            frame_stride_bytes = int(params["src_frame_stride"]) * run_frames[0].pixels.itemsize
            position = (launch.src_byte_offset + z * frame_stride_bytes) // frame_bytes
            planes = preprocess_frame_reference(run_frames[position], spec)
            start = launch.dst_byte_offset // itemsize + z * int(params["dst_frame_stride"])
            for w in range(int(params["n_windows"])):
                at = start + w * int(params["dst_channel_stride"])
                assert np.isnan(out[at:at + layout.plane_elements]).all(), "a plane was written twice"
                out[at:at + layout.plane_elements] = planes[w].ravel()
    return out.reshape(layout.shape())


@pytest.mark.parametrize("uniform", [True, False])
def test_launch_plan_fills_every_channel_with_its_stack(uniform):
    series = frames(7)
    layout = BindingLayout.from_spec(SPEC, max_batch=4)
    first, batch = 4, 3
    run = stack_source_indices(len(series), first, batch, SPEC.slices)
    launches = plan_launches(layout, batch, series[0].pixels.nbytes, uniform)
    assert len(launches) == (SPEC.slices if uniform else SPEC.slices * batch)
    got = emulate_launches(layout, launches, [series[i] for i in run], SPEC)
    planes = [preprocess_frame_reference(f, SPEC) for f in series]
    half = SPEC.slices // 2
    for b in range(batch):  # what edge/detector.py feeds the model for centre first + b
        want = np.concatenate([planes[min(max(first + b + s - half, 0), len(series) - 1)]
                               for s in range(SPEC.slices)])
        np.testing.assert_array_equal(got[b], want)
    assert np.isnan(got[batch:]).all()  # samples beyond the batch untouched


def test_launch_params_strides_follow_the_binding():
    f = frames(1, rows=20, cols=16)[0]
    layout = BindingLayout.from_spec(SPEC, max_batch=2)
    p = launch_params(f, SPEC, layout)[0]
    assert int(p["src_frame_stride"]) == 20 * 16
    assert int(p["dst_frame_stride"]) == SPEC.channels * 12 * 10
    assert int(p["dst_channel_stride"]) == 12 * 10


# -- slot scheduling (order of host / GPU steps only)


class RecordingSteps:
    """Callbacks that record the order in which the schedule calls them."""

    def __init__(self):
        self.log = []

    def fill(self, slot, batch):
        self.log.append(("fill", slot, batch))

    def submit(self, slot, batch):
        self.log.append(("submit", slot, batch))

    def wait(self, slot):
        self.log.append(("wait", slot, None))

    def collect(self, slot, batch):
        self.log.append(("collect", slot, batch))
        return batch


@pytest.mark.parametrize("n_slots", [1, 2, 3])
@pytest.mark.parametrize("n_batches", [0, 1, 2, 5])
def test_schedule_overlaps_fill_with_gpu_work_and_keeps_order(n_slots, n_batches):
    steps = RecordingSteps()
    results = list(DoubleBufferedSchedule(n_slots, steps.fill, steps.submit, steps.wait, steps.collect)
                   .run(range(n_batches)))
    assert results == list(range(n_batches))
    log = steps.log
    at = {(kind, batch): i for i, (kind, _, batch) in enumerate(log) if kind != "wait"}
    in_flight = 0
    for kind, slot, batch in log:
        in_flight += {"submit": 1, "collect": -1}.get(kind, 0)
        assert 0 <= in_flight <= n_slots
        if kind in ("fill", "submit", "collect"):
            assert slot == batch % n_slots
    for k in range(n_batches):
        assert log[at[("collect", k)] - 1] == ("wait", k % n_slots, None)  # outputs read only after its event
        if k >= n_slots:  # a slot is refilled only after its previous batch was collected
            assert at[("collect", k - n_slots)] < at[("fill", k)]
        if n_slots >= 2 and k + 1 < n_batches:  # batch k+1 is decoded while batch k is on the GPU
            assert at[("submit", k)] < at[("fill", k + 1)] < at[("collect", k)]


# -- on a GPU (skipped without pycuda and a device)


def cuda_device_or_skip():
    if not HAVE_PYCUDA:
        pytest.skip("pycuda is not installed (pip install 'ct-edge[gpu]'; GPU machines only)")
    import pycuda.driver as driver

    try:
        driver.init()
        if driver.Device.count() < 1:
            pytest.skip("pycuda is installed but no CUDA device is visible")
    except driver.Error as e:
        pytest.skip(f"pycuda is installed but CUDA is unusable here: {e}")


class CopyModel:
    """Stand-in for TensorRT in this test only: output 'planes' = the input binding, copied on the stream."""

    input_name = "input"

    def __init__(self, layout_chw, dtype):
        self.chw, self.dtype = layout_chw, np.dtype(dtype)

    def input_binding(self):
        return self.chw, self.dtype

    def output_shapes(self, batch):
        return {"planes": ((batch,) + self.chw, self.dtype)}

    def enqueue_device(self, batch, input_ptr, output_ptrs, stream):
        import pycuda.driver as driver

        nbytes = batch * int(np.prod(self.chw)) * self.dtype.itemsize
        driver.memcpy_dtod_async(output_ptrs["planes"], input_ptr, nbytes, stream)


@pytest.mark.parametrize("host_memory", ["mapped", "pinned"])
def test_pipeline_on_gpu_matches_the_reference(host_memory):
    cuda_device_or_skip()
    from edge.gpu.cuda_context import CudaContext
    from edge.gpu.pipeline import GpuSlicePipeline

    series = frames(7)
    with CudaContext(0) as ctx:
        model = CopyModel((SPEC.channels, SPEC.out_height, SPEC.out_width), SPEC.dtype)
        pipeline = GpuSlicePipeline(model, SPEC, ctx.properties, max_batch=3, host_memory=host_memory)
        try:
            results = list(pipeline.run(series))
        finally:
            pipeline.close()
    planes = [preprocess_frame_reference(f, SPEC) for f in series]
    assert [(r.first_center, r.count) for r in results] == [(0, 3), (3, 3), (6, 1)]
    for r in results:
        for b in range(r.count):
            i = r.first_center + b
            want = np.concatenate([planes[min(max(i + s - 1, 0), 6)] for s in range(3)])
            np.testing.assert_allclose(r.outputs["planes"][b], want, atol=1e-5)
