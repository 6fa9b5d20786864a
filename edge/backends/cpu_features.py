"""What this CPU's ONNX Runtime integer kernels can be trusted with."""

import platform
import re
from pathlib import Path

SATURATING_KERNELS = ("this x86-64 CPU has no VNNI: ONNX Runtime's fused u8s8 kernels sum int8 pairs in saturating "
                      "int16 (vpmaddubsw), so an INT8 model's outputs are wrong here")


def integer_kernels_saturate(cpuinfo_path="/proc/cpuinfo") -> bool:
    """True on x86-64 CPUs without VNNI (AVX2 only), where ONNX Runtime's u8s8 kernels saturate.

    Other architectures (the Jetson's Arm cores) and CPUs whose flags cannot be read count as safe.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        cpuinfo = Path(cpuinfo_path).read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", cpuinfo) is None
