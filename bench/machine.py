"""What every committed benchmark result records about the machine it ran on."""

import json
import os
import platform
from pathlib import Path


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


def finish_check(report: dict, status: int, out_dir: Path, stem: str, write_markdown) -> int:
    """Close a GPU check: it passes only when every check passed and nothing raised.

    Writes ``<stem>.json`` and ``<stem>.md`` (``write_markdown(report, path)``) under
    ``out_dir``, prints the markdown, and returns the exit status (1 on a failed check).
    """
    report["passed"] = bool(status == 0 and report["checks"] and all(c["passed"] for c in report["checks"])
                            and not report["errors"])
    if status == 0 and not report["passed"]:
        status = 1
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out_dir / f"{stem}.md")
    print((out_dir / f"{stem}.md").read_text())
    return status
