"""Host arrays the GPU reads or writes: zero-copy mapped memory, or pinned memory plus a device copy.

``mapped`` (the Jetson path): one page-locked host allocation made with
``pycuda.driver.pagelocked_empty(..., mem_flags=host_alloc_flags.DEVICEMAP)``
and mapped into the device's address space; ``HostAllocation.get_device_pointer()``
gives the address kernels and TensorRT use. On an integrated GPU host and
device share the same DRAM, so decoded frames written here are read by the
preprocessing kernel with no cudaMemcpy, and engine outputs written here are
read by the CPU with no copy back. On Xavier and Orin the GPU snoops the CPU
caches (I/O coherency), so the host side of this memory stays CPU-cached.

``pinned`` (discrete GPUs): page-locked host memory plus a device allocation;
:meth:`HostDeviceBuffer.to_device` / :meth:`HostDeviceBuffer.to_host` copy
asynchronously on the pipeline's stream. Kernels could read mapped memory
across PCIe too, but bilinear resampling reads each source pixel several
times, so one bulk DMA into device memory is faster there (the GPU check
measures both: bench/gpu_pipeline_check.py).

Either way the caller sees the same thing: ``host`` (a NumPy array) and
``device_ptr`` (an int), valid while the buffer lives.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

from edge.errors import ConfigError
from edge.gpu.cuda_context import DeviceProperties, import_pycuda_driver

MAPPED = "mapped"
PINNED = "pinned"
HOST_MEMORY_MODES = ("auto", MAPPED, PINNED)
DEVICE_ALIGNMENT = 256  # bytes; cudaMalloc's alignment, kept for every region the GPU path hands out


def choose_host_memory(props: DeviceProperties, requested: str = "auto") -> str:
    """``mapped`` on integrated GPUs that can map host memory, ``pinned`` elsewhere, unless ``requested``."""
    if requested not in HOST_MEMORY_MODES:
        raise ConfigError(f"gpu.host_memory must be one of {', '.join(HOST_MEMORY_MODES)}, got {requested!r}")
    if requested == "auto":
        return MAPPED if props.zero_copy_preferred else PINNED
    if requested == MAPPED and not props.can_map_host_memory:
        raise ConfigError(f"gpu.host_memory is 'mapped' but {props.name} cannot map host memory")
    return requested


def align_up(nbytes: int, alignment: int = DEVICE_ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    return (int(nbytes) + alignment - 1) & ~(alignment - 1)


def array_nbytes(shape: Sequence[int], dtype) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * np.dtype(dtype).itemsize


class HostDeviceBuffer:
    """A C-contiguous array of ``shape`` and ``dtype`` visible to host (``host``) and device (``device_ptr``)."""

    def __init__(self, shape: Sequence[int], dtype, mode: str):
        if mode not in (MAPPED, PINNED):
            raise ConfigError(f"host memory mode must be {MAPPED!r} or {PINNED!r}, got {mode!r}")
        driver = import_pycuda_driver()
        self.mode = mode
        self.shape: Tuple[int, ...] = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._driver = driver
        self._device_allocation = None
        if mode == MAPPED:
            self.host = driver.pagelocked_empty(self.shape, self.dtype, mem_flags=driver.host_alloc_flags.DEVICEMAP)
            self.device_ptr = int(self.host.base.get_device_pointer())
        else:
            self.host = driver.pagelocked_empty(self.shape, self.dtype)
            self._device_allocation = driver.mem_alloc(max(1, self.host.nbytes))
            self.device_ptr = int(self._device_allocation)

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    @property
    def zero_copy(self) -> bool:
        return self.mode == MAPPED

    def to_device(self, stream, nbytes: Optional[int] = None) -> None:
        """Make the first ``nbytes`` (default all) of ``host`` visible to kernels on ``stream``."""
        if self.mode == PINNED:
            self._driver.memcpy_htod_async(self.device_ptr, self._host_bytes(nbytes), stream)

    def to_host(self, stream, nbytes: Optional[int] = None) -> None:
        """Make the first ``nbytes`` (default all) the device wrote visible in ``host`` once ``stream`` reaches here."""
        if self.mode == PINNED:
            self._driver.memcpy_dtoh_async(self._host_bytes(nbytes), self.device_ptr, stream)

    def _host_bytes(self, nbytes: Optional[int]) -> np.ndarray:
        flat = self.host.reshape(-1).view(np.uint8)
        if nbytes is None:
            return flat
        if not 0 <= nbytes <= flat.nbytes:
            raise ValueError(f"nbytes={nbytes} outside this {flat.nbytes}-byte buffer")
        return flat[:nbytes]

    def free(self) -> None:
        """Release now (needs the CUDA context current) rather than at garbage collection."""
        if self._device_allocation is not None:
            self._device_allocation.free()
            self._device_allocation = None
        base = getattr(self.host, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()
        self.host = None
        self.device_ptr = 0


class DeviceBuffer:
    """Plain device memory (TensorRT input binding regions, engine outputs on discrete GPUs)."""

    def __init__(self, nbytes: int):
        driver = import_pycuda_driver()
        self.nbytes = int(nbytes)
        self._allocation = driver.mem_alloc(max(1, self.nbytes))
        self.device_ptr = int(self._allocation)

    def free(self) -> None:
        if self._allocation is not None:
            self._allocation.free()
            self._allocation = None
            self.device_ptr = 0
