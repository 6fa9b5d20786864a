"""The CUDA context the GPU path runs in, and what the device is (integrated or discrete).

pycuda is imported lazily. :class:`CudaContext` retains the device's primary
context, the one the CUDA runtime API (and so TensorRT, CuPy, PyTorch) uses,
so buffers, kernels and engines all share it.

Integrated GPUs (Jetson: Xavier, Orin) share physical memory with the CPU
(``CU_DEVICE_ATTRIBUTE_INTEGRATED``): host memory mapped into the device's
address space is read by kernels with no copy. Discrete GPUs reach mapped host
memory over PCIe, so there a copy to device memory is faster for data read
more than once (see :mod:`edge.gpu.mapped_buffers`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Tuple

from edge.errors import MissingDependencyError

TEGRA_RELEASE_FILE = Path("/etc/nv_tegra_release")
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")


def import_pycuda_driver():
    """``pycuda.driver``, or MissingDependencyError saying how to get it."""
    try:
        import pycuda.driver as driver
    except ImportError as e:
        raise MissingDependencyError(
            f"the GPU path needs pycuda (pip install 'ct-edge[gpu]'; on Jetson see jetson/install.sh): {e}"
        ) from None
    return driver


@dataclass(frozen=True)
class DeviceProperties:
    """The properties of a CUDA device the runtime decides on."""

    index: int
    name: str
    compute_capability: Tuple[int, int]
    total_memory_bytes: int
    multiprocessors: int
    integrated: bool  # shares physical memory with the host (Jetson)
    can_map_host_memory: bool
    unified_addressing: bool

    @property
    def compute_capability_str(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def zero_copy_preferred(self) -> bool:
        """Mapped host memory is the fast path only where host and device share memory."""
        return self.integrated and self.can_map_host_memory

    @classmethod
    def from_attributes(cls, index: int, name: str, compute_capability: Tuple[int, int], total_memory_bytes: int,
                        attributes: Mapping[str, int]) -> "DeviceProperties":
        """From attribute values keyed by pycuda ``device_attribute`` names (INTEGRATED, ...)."""
        return cls(
            index=int(index),
            name=str(name),
            compute_capability=(int(compute_capability[0]), int(compute_capability[1])),
            total_memory_bytes=int(total_memory_bytes),
            multiprocessors=int(attributes.get("MULTIPROCESSOR_COUNT", 0)),
            integrated=bool(attributes.get("INTEGRATED", 0)),
            can_map_host_memory=bool(attributes.get("CAN_MAP_HOST_MEMORY", 0)),
            unified_addressing=bool(attributes.get("UNIFIED_ADDRESSING", 0)),
        )


_ATTRIBUTES = ("MULTIPROCESSOR_COUNT", "INTEGRATED", "CAN_MAP_HOST_MEMORY", "UNIFIED_ADDRESSING")


def device_properties(device, index: int = -1) -> DeviceProperties:
    """Properties of a ``pycuda.driver.Device`` (``index`` as the caller numbered it)."""
    driver = import_pycuda_driver()
    attributes = {name: int(device.get_attribute(getattr(driver.device_attribute, name))) for name in _ATTRIBUTES}
    return DeviceProperties.from_attributes(index, device.name(), device.compute_capability(),
                                            device.total_memory(), attributes)


def is_jetson(tegra_release: Path = TEGRA_RELEASE_FILE, compatible: Path = DEVICE_TREE_COMPATIBLE) -> bool:
    """True on an NVIDIA Jetson (L4T): its release file exists or the device tree names a Tegra SoC."""
    if tegra_release.exists():
        return True
    try:
        return b"nvidia,tegra" in compatible.read_bytes()
    except OSError:
        return False


class CudaContext:
    """The primary context of one device, made current on the calling thread.

    Use as a context manager or ``activate()`` / ``release()``. Every pycuda
    object (buffers, streams, events, modules) must be freed while it is current.
    """

    def __init__(self, device_index: int = 0):
        self.device_index = int(device_index)
        self.device = None
        self.context = None
        self.properties = None

    def activate(self) -> "CudaContext":
        if self.context is not None:
            raise RuntimeError("CudaContext is already active")
        driver = import_pycuda_driver()
        driver.init()
        count = driver.Device.count()
        if not 0 <= self.device_index < count:
            raise MissingDependencyError(
                f"CUDA device {self.device_index} requested, {count} device(s) visible")
        self.device = driver.Device(self.device_index)
        self.context = self.device.retain_primary_context()
        self.context.push()
        self.properties = device_properties(self.device, self.device_index)
        return self

    def push(self) -> None:
        """Make the context current on this thread (e.g. a worker thread)."""
        self.context.push()

    def pop(self) -> None:
        import_pycuda_driver().Context.pop()

    def synchronize(self) -> None:
        import_pycuda_driver().Context.synchronize()

    def release(self) -> None:
        """Pop the context and drop this retain (as ``pycuda.autoprimaryctx`` does at exit);
        the primary context lives on while TensorRT or another library retains it."""
        if self.context is not None:
            from pycuda.tools import clear_context_caches

            self.context.pop()
            self.context = None
            clear_context_caches()

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.release()
