"""What every committed benchmark result records about the machine it ran on."""

import os
import platform


def machine_info(threads: int) -> dict:
    """CPU model, core count, threads used, platform, niceness and load average at start."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "threads_used": threads, "platform": platform.platform()}
    if hasattr(os, "nice"):
        info["niceness"] = os.nice(0)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info
