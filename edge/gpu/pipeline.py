"""The zero-copy, double-buffered GPU slice pipeline: decoded frames -> fused kernel -> TensorRT -> outputs.

Per batch of B centre slices of one ordered series, in one of two slots:

1. fill (host): the B + slices - 1 frames the batch's 2.5D stacks need are
   written into the slot's frame run (mapped host memory on Jetson, so no
   cudaMemcpy follows; pinned memory plus one async copy on discrete GPUs);
2. preprocess (GPU): the fused kernel (``CudaPreprocessor``'s module) writes
   each stack's planes straight into the slot's TensorRT input binding region
   at channel ``slice_offset * n_windows``: one launch per slice offset covers
   all B samples (grid z), because sample b at offset s reads run frame b + s;
3. infer (GPU): the model's ``enqueue_device`` (``execute_async_v3``) on the
   same stream, writing the slot's output buffers;
4. the slot's event is recorded after the outputs are readable by the host.

All GPU work goes on one stream. The host fills batch k+1 into the other slot
while the GPU works on batch k, then waits for batch k's event and collects
its outputs (:class:`DoubleBufferedSchedule`). A slot is refilled only after
its previous batch was collected, so the host never overwrites frames the GPU
is still reading, nor reads outputs the GPU is still writing.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge.errors import ConfigError, InputError
from edge.frame import CTFrame
from edge.gpu.cuda_context import DeviceProperties, import_pycuda_driver
from edge.gpu.mapped_buffers import DeviceBuffer, HostDeviceBuffer, align_up, choose_host_memory
from edge.preprocess import cuda_kernel
from edge.preprocess.spec import PreprocessSpec

# ----------------------------------------------------------------------------------------------
# Layout arithmetic (pure)


@dataclass(frozen=True)
class BindingLayout:
    """The NCHW input binding of a 2.5D model: channel = slice_offset * n_windows + window."""

    max_batch: int
    slices: int
    n_windows: int
    height: int
    width: int
    dtype: np.dtype

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        for key in ("max_batch", "slices", "n_windows", "height", "width"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"binding layout: {key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_spec(cls, spec: PreprocessSpec, max_batch: int, dtype=None) -> "BindingLayout":
        return cls(int(max_batch), spec.slices, len(spec.windows), spec.out_height, spec.out_width,
                   np.dtype(dtype or spec.dtype))

    @property
    def channels(self) -> int:
        return self.slices * self.n_windows

    @property
    def plane_elements(self) -> int:
        return self.height * self.width

    @property
    def sample_elements(self) -> int:
        return self.channels * self.plane_elements

    def shape(self, batch: Optional[int] = None) -> Tuple[int, int, int, int]:
        return (self.max_batch if batch is None else int(batch), self.channels, self.height, self.width)

    def nbytes(self, batch: Optional[int] = None) -> int:
        return int(np.prod(self.shape(batch), dtype=np.int64)) * self.dtype.itemsize

    def channel_offset(self, slice_offset: int) -> int:
        """First channel of the planes of the stack's ``slice_offset``-th slice."""
        if not 0 <= slice_offset < self.slices:
            raise ValueError(f"slice offset {slice_offset} outside 0..{self.slices - 1}")
        return slice_offset * self.n_windows

    def plane_byte_offset(self, sample: int, slice_offset: int) -> int:
        """Byte offset in the binding of sample ``sample``'s planes for its ``slice_offset``-th slice."""
        if not 0 <= sample < self.max_batch:
            raise ValueError(f"sample {sample} outside 0..{self.max_batch - 1}")
        channel = sample * self.channels + self.channel_offset(slice_offset)
        return channel * self.plane_elements * self.dtype.itemsize


def stack_source_indices(n_frames: int, first_center: int, batch: int, slices: int) -> List[int]:
    """Series indices of the frame run a batch needs: centres ``first_center ...`` each with
    ``slices // 2`` neighbours per side, clamped at the series ends (as the CPU detector does).
    Sample b, slice offset s reads run position b + s."""
    if n_frames < 1 or batch < 1 or slices < 1 or slices % 2 == 0:
        raise ValueError(f"bad run request: n_frames={n_frames}, batch={batch}, slices={slices}")
    if not 0 <= first_center <= n_frames - batch:
        raise ValueError(f"centres {first_center}..{first_center + batch - 1} outside 0..{n_frames - 1}")
    half = slices // 2
    return [min(max(first_center + j - half, 0), n_frames - 1) for j in range(batch + slices - 1)]


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of the fused kernel, as offsets into a slot's frame run and input binding."""

    src_byte_offset: int
    dst_byte_offset: int
    n_frames: int
    run_position: int  # whose PreprocessParams to use (first frame of the launch)


def plan_launches(layout: BindingLayout, batch: int, frame_bytes: int, uniform: bool) -> List[KernelLaunch]:
    """Launches that fill ``batch`` samples. With ``uniform`` params across the run (same rescale,
    padding, spacing: the usual CT series), one launch per slice offset spans all samples (grid z);
    otherwise one launch per sample and slice offset."""
    if not 1 <= batch <= layout.max_batch:
        raise ValueError(f"batch {batch} outside 1..{layout.max_batch}")
    if uniform:
        return [KernelLaunch(s * frame_bytes, layout.plane_byte_offset(0, s), batch, s) for s in range(layout.slices)]
    return [KernelLaunch((b + s) * frame_bytes, layout.plane_byte_offset(b, s), 1, b + s)
            for b in range(batch) for s in range(layout.slices)]


def launch_params(frame: CTFrame, spec: PreprocessSpec, layout: BindingLayout) -> np.ndarray:
    """Kernel parameters for a frame of the run: frames are contiguous in the run,
    consecutive samples are ``sample_elements`` apart in the binding."""
    rows, cols = np.asarray(frame.pixels).shape
    return cuda_kernel.frame_params(frame, spec, src_frame_stride=rows * cols,
                                    dst_frame_stride=layout.sample_elements)


# ----------------------------------------------------------------------------------------------
# Scheduling (pure)


class DoubleBufferedSchedule:
    """Runs batches through ``n_slots`` slots so that host work overlaps GPU work.

    ``fill(slot, batch)`` is host work (decode into the slot), ``submit(slot, batch)``
    enqueues the GPU work and records the slot's event, ``wait(slot)`` blocks on that
    event and ``collect(slot, batch)`` returns the result. Batch k + 1 is filled and
    submitted before batch k is waited for; results come out in batch order.
    """

    def __init__(self, n_slots: int, fill: Callable, submit: Callable, wait: Callable, collect: Callable):
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        self.n_slots = n_slots
        self._fill, self._submit, self._wait, self._collect = fill, submit, wait, collect

    def run(self, batches: Iterable) -> Iterator:
        in_flight = deque()
        for k, batch in enumerate(batches):
            slot = k % self.n_slots
            self._fill(slot, batch)
            self._submit(slot, batch)
            in_flight.append((slot, batch))
            if len(in_flight) == self.n_slots:
                done_slot, done_batch = in_flight.popleft()
                self._wait(done_slot)
                yield self._collect(done_slot, done_batch)
        while in_flight:
            done_slot, done_batch = in_flight.popleft()
            self._wait(done_slot)
            yield self._collect(done_slot, done_batch)


# ----------------------------------------------------------------------------------------------
# The GPU pipeline


@dataclass(frozen=True)
class BatchPlan:
    first_center: int
    count: int
    run: Tuple[int, ...]  # series indices of the frame run


@dataclass
class BatchResult:
    """Outputs of centres ``first_center .. first_center + count - 1`` (copies owned by the caller)."""

    first_center: int
    count: int
    outputs: Dict[str, np.ndarray]
    timings_ms: Dict[str, float] = field(default_factory=dict)


class DeviceModel:
    """What the pipeline needs from an inference backend (TensorRtRunner implements it)."""

    input_name: str
    profile: Tuple[int, int, int] = (1, 1, 1 << 30)  # (min, opt, max) batch the model accepts

    def input_binding(self) -> Tuple[Tuple[int, int, int], np.dtype]:
        """(C, H, W) and dtype of the input binding."""
        raise NotImplementedError

    def output_shapes(self, batch: int) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        raise NotImplementedError

    def enqueue_device(self, batch: int, input_ptr: int, output_ptrs: Mapping[str, int], stream) -> None:
        """Enqueue inference on ``stream`` reading ``input_ptr`` and writing ``output_ptrs``."""
        raise NotImplementedError


def launch_kernel(preprocessor, src_ptr: int, dst_ptr: int, params: np.ndarray, *, src_dtype, dst_dtype,
                  n_frames: int, stream) -> None:
    """Launch the fused kernel of a ``CudaPreprocessor`` on raw device addresses."""
    kernel = preprocessor._kernel(src_dtype, dst_dtype)  # no public raw-pointer launch in CudaPreprocessor yet
    grid = cuda_kernel.launch_grid(int(params["dst_rows"][0]), int(params["dst_cols"][0]), n_frames)
    kernel(np.uint64(src_ptr), np.uint64(dst_ptr), params[0], block=cuda_kernel.BLOCK, grid=grid, stream=stream)


class _Slot:
    def __init__(self, driver, layout: BindingLayout, output_specs, mode: str):
        self.binding = DeviceBuffer(align_up(layout.nbytes()))
        self.outputs = {name: HostDeviceBuffer(shape, dtype, mode) for name, (shape, dtype) in output_specs.items()}
        self.frames: Optional[HostDeviceBuffer] = None
        self.params: List[np.ndarray] = []
        self.uniform = True
        self.out_shapes: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {}
        self.fill_ms = 0.0
        self.events = {name: driver.Event() for name in ("start", "preprocessed", "inferred", "done")}

    def free(self):
        for buf in [self.binding, self.frames, *self.outputs.values()]:
            if buf is not None:
                buf.free()


class GpuSlicePipeline:
    """Preprocess and infer ordered series on the GPU, double-buffered (see the module docstring).

    Needs a current CUDA context (:class:`edge.gpu.cuda_context.CudaContext`, or the
    one TensorRtRunner activated). ``host_memory``: "auto" (mapped on integrated GPUs,
    pinned on discrete ones), "mapped" or "pinned".
    """

    def __init__(self, model: DeviceModel, spec: PreprocessSpec, properties: DeviceProperties, *,
                 max_batch: int, host_memory: str = "auto", preprocessor=None, n_slots: int = 2):
        driver = import_pycuda_driver()
        (c, h, w), dtype = model.input_binding()
        self.layout = BindingLayout.from_spec(spec, max_batch, dtype)
        if (c, h, w) != (self.layout.channels, self.layout.height, self.layout.width):
            raise ConfigError(f"model input is (N, {c}, {h}, {w}) but the preprocessing spec produces "
                              f"(N, {self.layout.channels}, {self.layout.height}, {self.layout.width})")
        profile = tuple(getattr(model, "profile", DeviceModel.profile))
        if not profile[0] <= self.layout.max_batch <= profile[2]:
            raise ConfigError(f"max_batch {self.layout.max_batch} is outside the model's batch range "
                              f"{profile[0]}..{profile[2]}")
        # A static-batch engine (DLA needs one) runs every batch at its fixed size: a short last
        # batch is padded with whatever the binding holds and only its own outputs are collected.
        self.min_engine_batch = int(profile[0])
        self.spec = spec
        self.model = model
        self.mode = choose_host_memory(properties, host_memory)
        self.preprocessor = preprocessor if preprocessor is not None else cuda_kernel.CudaPreprocessor(spec)
        self._driver = driver
        self.stream = driver.Stream()
        output_specs = model.output_shapes(self.layout.max_batch)
        self.slots = [_Slot(driver, self.layout, output_specs, self.mode) for _ in range(n_slots)]
        self._frames: Sequence[CTFrame] = ()
        self._fill_frame: Optional[Callable[[int, np.ndarray], None]] = None

    # -- public

    def run(self, frames: Sequence[CTFrame], *, batch_size: Optional[int] = None,
            fill_frame: Optional[Callable[[int, np.ndarray], None]] = None) -> Iterator[BatchResult]:
        """Yield one BatchResult per batch of centre slices, in order, for an ordered series.

        ``fill_frame(index, out)`` decodes frame ``index``'s stored pixels into ``out`` (a view
        of the slot's frame run); by default it copies ``frames[index].pixels``.
        """
        batch_size = self.layout.max_batch if batch_size is None else int(batch_size)
        if not 1 <= batch_size <= self.layout.max_batch:
            raise ConfigError(f"batch size must be in 1..{self.layout.max_batch} (the binding's capacity), "
                              f"got {batch_size}")
        self._frames = list(frames)
        if not self._frames:
            return iter(())
        self._fill_frame = fill_frame or self._copy_frame
        n = len(self._frames)
        plans = [BatchPlan(i, min(batch_size, n - i),
                           tuple(stack_source_indices(n, i, min(batch_size, n - i), self.layout.slices)))
                 for i in range(0, n, batch_size)]
        schedule = DoubleBufferedSchedule(len(self.slots), self._fill, self._submit, self._wait, self._collect)
        return schedule.run(plans)

    def close(self) -> None:
        """Free the slots' memory (call with the CUDA context current)."""
        self.stream.synchronize()
        for slot in self.slots:
            slot.free()
        self.slots = []

    # -- schedule steps

    def _copy_frame(self, index: int, out: np.ndarray) -> None:
        np.copyto(out, np.asarray(self._frames[index].pixels), casting="no")

    def _frame_buffer(self, slot: _Slot, frame: CTFrame) -> HostDeviceBuffer:
        pixels = np.asarray(frame.pixels)
        if pixels.ndim != 2 or pixels.dtype not in (np.dtype(np.int16), np.dtype(np.uint16)):
            raise InputError(frame.source, f"GPU preprocessing needs 2-D int16/uint16 stored pixels, "
                                           f"got {pixels.dtype} {pixels.shape}")
        capacity = self.layout.max_batch + self.layout.slices - 1
        want = (capacity,) + pixels.shape
        if slot.frames is None or slot.frames.shape != want or slot.frames.dtype != pixels.dtype:
            if slot.frames is not None:
                slot.frames.free()
            slot.frames = HostDeviceBuffer(want, pixels.dtype, self.mode)
        return slot.frames

    def _fill(self, slot_index: int, plan: BatchPlan) -> None:
        slot = self.slots[slot_index]
        t0 = time.perf_counter()
        first = self._frames[plan.run[0]]
        frames_buf = self._frame_buffer(slot, first)
        for j, index in enumerate(plan.run):
            frame = self._frames[index]
            if np.asarray(frame.pixels).shape != frames_buf.shape[1:]:
                raise InputError(frame.source, f"frame size {np.asarray(frame.pixels).shape} differs from the "
                                               f"series' {frames_buf.shape[1:]}")
            self._fill_frame(index, frames_buf.host[j])
        slot.params = [launch_params(self._frames[i], self.spec, self.layout) for i in plan.run]
        slot.uniform = all(p.tobytes() == slot.params[0].tobytes() for p in slot.params[1:])
        slot.fill_ms = (time.perf_counter() - t0) * 1e3

    def _submit(self, slot_index: int, plan: BatchPlan) -> None:
        slot, stream = self.slots[slot_index], self.stream
        frames_buf = slot.frames
        frame_bytes = int(np.prod(frames_buf.shape[1:])) * frames_buf.dtype.itemsize
        slot.events["start"].record(stream)
        frames_buf.to_device(stream, nbytes=len(plan.run) * frame_bytes)
        for launch in plan_launches(self.layout, plan.count, frame_bytes, slot.uniform):
            launch_kernel(self.preprocessor, frames_buf.device_ptr + launch.src_byte_offset,
                          slot.binding.device_ptr + launch.dst_byte_offset, slot.params[launch.run_position],
                          src_dtype=frames_buf.dtype, dst_dtype=self.layout.dtype, n_frames=launch.n_frames,
                          stream=stream)
        slot.events["preprocessed"].record(stream)
        engine_batch = max(plan.count, self.min_engine_batch)
        shapes = self.model.output_shapes(engine_batch)
        self.model.enqueue_device(engine_batch, slot.binding.device_ptr,
                                  {name: buf.device_ptr for name, buf in slot.outputs.items()}, stream)
        slot.events["inferred"].record(stream)
        slot.out_shapes = {}
        for name, (shape, dtype) in shapes.items():
            if not shape or shape[0] != engine_batch:
                raise ConfigError(f"model output {name!r} has shape {shape}; the pipeline needs outputs "
                                  f"whose first dimension is the batch ({engine_batch})")
            shape = (plan.count,) + tuple(shape[1:])  # outputs are batch-major: keep this batch's samples
            slot.out_shapes[name] = (shape, dtype)
            slot.outputs[name].to_host(stream, nbytes=int(np.prod(shape)) * np.dtype(dtype).itemsize)
        slot.events["done"].record(stream)

    def _wait(self, slot_index: int) -> None:
        self.slots[slot_index].events["done"].synchronize()

    def _collect(self, slot_index: int, plan: BatchPlan) -> BatchResult:
        slot = self.slots[slot_index]
        outputs = {}
        for name, (shape, dtype) in slot.out_shapes.items():
            count = int(np.prod(shape))
            outputs[name] = slot.outputs[name].host.reshape(-1)[:count].reshape(shape).copy()
        ev = slot.events
        timings = {
            "fill": slot.fill_ms,
            "preprocess": ev["preprocessed"].time_since(ev["start"]),
            "infer": ev["inferred"].time_since(ev["preprocessed"]),
            "copy_out": ev["done"].time_since(ev["inferred"]),
        }
        return BatchResult(plan.first_center, plan.count, outputs, timings)
