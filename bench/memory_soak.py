"""Resident memory over a long stream: thousands of CT frames through the streaming service, RSS sampled.

The real service (:class:`~edge.ingest.service.EdgeService`: intake checks, spool write + fsync,
ledger, pipeline threads, streaming detection, JSONL/overlay/SR outputs) runs in this process
without its SCP; instances enter through :meth:`~edge.ingest.intake.Intake.offer_dataset`, the
call the Storage SCP makes for each C-STORE, and a "busy" answer is retried as a scanner would.
One phantom series is generated once and sent again and again as new series (fresh Study,
Series and SOP Instance UIDs each time, re-encoded and parsed back as received data), so
every frame is new to the runtime. Resident memory (psutil RSS) is sampled every
``--sample-every`` frames sent, and once more after the drain.

Pass/fail: after a warm-up (the first 20 % of the frames), the least-squares slope of RSS must
be <= 2 MB per 1,000 frames (a 512x512 int16 frame is 0.5 MB, so keeping even one frame in 250
would fail) and the last sample at most 32 MB above the first post-warm-up one. RSS rises in
steps while the bounded queues reach their high-water marks (up to ``max_in_flight`` decoded
frames, ``infer_queue`` preprocessed ones), ONNX Runtime sizes its buffers for each batch size
and the allocator's per-thread arenas fill; once they have all been reached (a few hundred
frames), further growth is what the bound judges.

torch is never imported here (the device runtime does not import it); a preliminary model
is made in a child process.

    PYTHONPATH=. python bench/memory_soak.py [--model M] [--frames 5000] [--size 512] [--out bench/results]

Writes memory_soak.json and memory_soak.md (machine, date, command, versions).
"""

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.e2e_bench import command_line, machine_info, resolve_model, utc_now, versions  # noqa: E402

RESULT_NAME = "memory_soak"
SLOPE_BOUND_MB_PER_1000 = 2.0
GROWTH_BOUND_MB = 32.0
WARMUP_FRACTION = 0.2
BUSY_RETRY_S = 0.005
ALLOCATOR_ENV = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")  # glibc tunables in effect


def template_datasets(size: int, n_slices: int, seed: int = 11):
    """The pydicom datasets of one phantom series (slices only), to be sent again under new UIDs."""
    from edge.phantom import generate_series, series_datasets

    return series_datasets(generate_series(seed, "ge_standard", size=size, n_slices=n_slices))


def fresh_instances(templates: Sequence, n_frames: int) -> Iterator[Tuple[str, object, bytes]]:
    """(SOP Instance UID, dataset, encoded file bytes) for ``n_frames`` instances: the templates over
    and over, each pass a new series of a new study, each instance with a new SOP Instance UID.
    The dataset is parsed back from the bytes, as the SCP hands a received one over."""
    import pydicom
    from pydicom.uid import generate_uid

    sent = 0
    while sent < n_frames:
        study, series = generate_uid(), generate_uid()
        for ds in templates:
            if sent >= n_frames:
                return
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            yield sop, pydicom.dcmread(io.BytesIO(data)), data
            sent += 1


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_soak(model_path, templates: Sequence, n_frames: int, sample_every: int, work_dir, threads: int = 2,
             batch_size: int = 4, series_idle_s: float = 1.0, sample: Callable[[], float] = rss_mb,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Stream ``n_frames`` instances through the service; RSS samples as [(frames sent, MB)] and counts."""
    from edge.config import config_from_dict
    from edge.ingest.intake import BUSY
    from edge.ingest.service import EdgeService

    work_dir = Path(work_dir)
    config = config_from_dict({
        "scp": {"enabled": False},
        "storage": {"state_dir": str(work_dir / "state")},
        "model": {"path": str(model_path), "intra_op_threads": threads, "batch_size": batch_size},
        "pipeline": {"series_idle_s": series_idle_s},
        "outputs": {"dir": str(work_dir / "results")},
        "metrics": {"enabled": False},
    }, source="bench/memory_soak.py")
    service = EdgeService(config).start(receive=False)
    samples: List[Tuple[int, float]] = [(0, sample())]
    busy = 0
    try:
        t0 = time.perf_counter()
        for i, (key, dataset, data) in enumerate(fresh_instances(templates, n_frames), 1):
            while service.intake.offer_dataset(key, dataset, data, source="soak").outcome == BUSY:
                busy += 1
                time.sleep(BUSY_RETRY_S)
            if i % sample_every == 0 or i == n_frames:
                samples.append((i, sample()))
                if progress is not None:
                    progress(f"{i} frames sent, RSS {samples[-1][1]:.1f} MB, {i / (time.perf_counter() - t0):.1f}/s")
        drained = service.drain()
        elapsed = time.perf_counter() - t0
        after_drain = sample()
        counts = service.ledger.counts()
        latency = service.pipeline.latency.summary()
        errors = list(service.pipeline.errors)
    finally:
        service.close()
    return {"samples": samples, "rss_after_drain_mb": after_drain, "drained": drained, "ledger": counts,
            "busy_retries": busy, "seconds": round(elapsed, 1), "frames_per_s": n_frames / elapsed,
            "pipeline_errors": errors, "latency": latency}


def rss_verdict(samples: Sequence[Tuple[int, float]], warmup_frames: int,
                slope_bound: float = SLOPE_BOUND_MB_PER_1000, growth_bound: float = GROWTH_BOUND_MB) -> dict:
    """First/last/max RSS, the post-warm-up slope (MB per 1,000 frames) and growth, and pass/fail."""
    frames = np.array([f for f, _ in samples], float)
    rss = np.array([m for _, m in samples], float)
    post = frames >= warmup_frames
    if post.sum() < 2:
        raise ValueError(f"need at least 2 samples after the warm-up of {warmup_frames} frames, got {int(post.sum())}")
    slope = float(np.polyfit(frames[post] / 1000.0, rss[post], 1)[0])
    baseline = float(rss[post][0])
    growth = float(rss[post][-1] - baseline)
    return {
        "first_mb": float(rss[0]), "last_mb": float(rss[-1]), "max_mb": float(rss.max()),
        "baseline_after_warmup_mb": baseline, "growth_after_warmup_mb": growth,
        "slope_mb_per_1000_frames": slope, "warmup_frames": int(warmup_frames),
        "slope_bound_mb_per_1000_frames": slope_bound, "growth_bound_mb": growth_bound,
        "passed": slope <= slope_bound and growth <= growth_bound,
    }


def build_report(run: dict, *, command: str, machine: dict, model: Tuple[Path, str, bool], specs, frames: int,
                 size: int, base_slices: int, sample_every: int, batch_size: int) -> dict:
    """The JSON report: ``run`` of :func:`run_soak`, its verdict and what was run where."""
    model_path, model_note, preliminary = model
    spec = specs.preprocess
    return {
        "tool": "bench/memory_soak.py",
        "date": utc_now(),
        "command": command,
        "machine": machine,
        "versions": versions(("numpy", "pydicom", "cv2", "onnxruntime", "pynetdicom", "highdicom", "psutil")),
        "preliminary": preliminary,
        "model": {"name": Path(model_path).name, "note": model_note,
                  "input": f"{spec.channels}x{spec.out_height}x{spec.out_width}"},
        "frames": frames, "size": size, "base_slices": base_slices, "sample_every": sample_every,
        "batch_size": batch_size,
        "torch_imported": "torch" in sys.modules,
        "environment": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
        "verdict": rss_verdict(run["samples"], warmup_frames=int(round(WARMUP_FRACTION * frames))),
        "run": run,
    }


def write_markdown(report: dict, path: Path) -> None:
    m, v, r = report["machine"], report["verdict"], report["run"]
    lines = ["# Resident memory over a long stream (streaming service, CPU)", ""]
    if report["preliminary"]:
        lines += ["**PRELIMINARY**: no trained student is committed; the run used a random-weight stand-in of the "
                  "student's size (see model). Memory behaviour does not depend on the weights; rerun with the "
                  "trained student (commands below).", ""]
    lines += [
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads_used']} ONNX Runtime intra-op "
        f"thread(s), load average at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')}",
        "- versions: " + ", ".join(f"{k} {v_}" for k, v_ in report["versions"].items()),
        f"- model: `{report['model']['name']}` ({report['model']['note']}), input {report['model']['input']}",
        f"- stream: {report['frames']} frames of {report['size']}x{report['size']} int16, one {report['base_slices']}-"
        "slice phantom series sent again and again with fresh Study/Series/SOP UIDs; service with spool, ledger, "
        "pipeline and outputs (JSONL, overlays, SR), fed through Intake.offer_dataset (the SCP's call); "
        f"torch imported: {report['torch_imported']}; allocator environment: "
        + (", ".join(f"{k}={v}" for k, v in report["environment"].items() if v is not None) or "glibc defaults"),
        f"- bound: after a warm-up of {v['warmup_frames']} frames, slope <= {v['slope_bound_mb_per_1000_frames']} MB "
        f"per 1,000 frames and growth <= {v['growth_bound_mb']:.0f} MB",
        "",
        f"**{'PASS' if v['passed'] else 'FAIL'}**: RSS first {v['first_mb']:.1f} MB, after warm-up "
        f"{v['baseline_after_warmup_mb']:.1f} MB, last {v['last_mb']:.1f} MB, max {v['max_mb']:.1f} MB; "
        f"slope {v['slope_mb_per_1000_frames']:+.2f} MB per 1,000 frames, growth after warm-up "
        f"{v['growth_after_warmup_mb']:+.1f} MB; after the drain {r['rss_after_drain_mb']:.1f} MB.",
        "",
        f"Throughput {r['frames_per_s']:.1f} frames/s ({r['seconds']:.0f} s), ledger {r['ledger']}, "
        f"{r['busy_retries']} busy retries (backpressure), pipeline errors: {len(r['pipeline_errors'])}.",
        "",
        "| frames sent | RSS MB |",
        "|---:|---:|",
    ]
    lines += [f"| {f} | {mb:.1f} |" for f, mb in r["samples"]]
    lines += [
        "",
        "## Rerun",
        "",
        "    PYTHONPATH=. python bench/memory_soak.py                      # committed model, 5,000 frames, 512x512",
        "    PYTHONPATH=. python bench/memory_soak.py --model edge/models/student.int8.cpu.onnx",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ONNX model (default: committed student/teacher, else a preliminary stand-in)")
    p.add_argument("--frames", type=int, default=5000, help="frames to stream (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="phantom image size (default %(default)s)")
    p.add_argument("--base-slices", type=int, default=50, help="slices of the series sent again (default %(default)s)")
    p.add_argument("--sample-every", type=int, default=250, help="RSS sample period in frames (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="inference batch (default %(default)s)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default=RESULT_NAME, help="result file stem (default %(default)s)")
    args = p.parse_args(argv)
    if args.sample_every < 1 or args.frames < 2 * args.sample_every:
        p.error("--sample-every must be >= 1 and --frames at least twice --sample-every")

    import cv2

    from edge.model_file import read_model_specs

    cv2.setNumThreads(args.threads)
    machine = machine_info(args.threads)
    work = Path(tempfile.mkdtemp(prefix="memory_soak_"))
    try:
        model_path, model_note, preliminary = resolve_model(args.model, work, in_subprocess=True)
        print(f"model: {model_path.name} ({model_note})", flush=True)
        templates = template_datasets(args.size, args.base_slices)
        run = run_soak(model_path, templates, args.frames, args.sample_every, work / "service", threads=args.threads,
                       batch_size=args.batch, progress=lambda line: print(line, flush=True))
        specs = read_model_specs(model_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report = build_report(run, command=command_line("bench/memory_soak.py", argv), machine=machine,
                          model=(model_path, model_note, preliminary), specs=specs, frames=args.frames, size=args.size,
                          base_slices=args.base_slices, sample_every=args.sample_every, batch_size=args.batch)
    verdict = report["verdict"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out_dir / f"{args.name}.md")
    print((out_dir / f"{args.name}.md").read_text())
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
