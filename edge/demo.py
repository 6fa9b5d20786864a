"""``edge demo``: the scanner demo, on loopback.

Makes phantom CT series (with ground truth), starts the runtime (Storage SCP,
spool, ledger, streaming detection, outputs), pushes the series over C-STORE as
a scanner would, waits for the results and reports findings against the ground
truth and per-stage latency. Everything lands under ``out_dir``.
"""

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from edge.errors import EdgeError


@dataclass(frozen=True)
class DemoOptions:
    out_dir: Path
    series: int = 2
    slices: int = 60
    size: int = 512
    seed: int = 2026
    rate: Optional[float] = None  # slices per second; None: as fast as the runtime accepts
    model: Optional[Path] = None
    report_threshold: Optional[float] = None  # None: the model's own (its validated operating point)


def _match(findings: List[dict], nodules, threshold: float):
    """(hits, misses, false positives) at ``threshold``: a finding within r of a nodule centre is a hit."""
    keep = [f for f in findings if f["probability"] >= threshold]
    hit_nodules, fps = set(), 0
    for f in keep:
        p = np.array([f["x"], f["y"], f["z"]])
        d = [np.linalg.norm(p - np.asarray(n.center)) / (n.diameter_mm / 2) for n in nodules]
        if d and min(d) < 1.0:
            hit_nodules.add(int(np.argmin(d)))
        else:
            fps += 1
    return len(hit_nodules), len(nodules) - len(hit_nodules), fps


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(opts: DemoOptions) -> Iterator[str]:
    from edge.cli import default_model_path
    from edge.config import config_from_dict
    from edge.ingest.replay import replay_cstore
    from edge.ingest.service import EdgeService
    from edge.phantom import PROFILES, generate_series, write_series

    out = Path(opts.out_dir).resolve()
    scanner_dir = out / "scanner"
    out.mkdir(parents=True, exist_ok=True)
    model = Path(opts.model) if opts.model else default_model_path()

    # 1. the "scanner": phantom series on disk, one profile each
    t0 = time.perf_counter()
    profiles = sorted(PROFILES)
    truth, files = {}, []
    for i in range(opts.series):
        s = generate_series(opts.seed + i, profiles[(opts.seed + i) % len(profiles)], size=opts.size,
                            n_slices=opts.slices, localizer=True)
        paths = write_series(s, scanner_dir / f"series_{i:02d}")
        truth[s.series_uid] = s
        files += paths
        yield (f"scanner: series {i + 1}/{opts.series} ({s.acquisition.profile.name}, {s.n_slices} slices "
               f"{opts.size}x{opts.size}, {len(s.nodules)} nodule(s)) written to {scanner_dir / f'series_{i:02d}'}")
    yield f"scanner: {len(files)} DICOM files made in {time.perf_counter() - t0:.1f} s"

    # 2. the runtime, on loopback with an ephemeral port
    config = config_from_dict({
        "scp": {"host": "127.0.0.1", "port": _free_loopback_port(), "ae_title": "CT_EDGE"},
        "storage": {"state_dir": str(out / "state")},
        "model": {"path": str(model)},
        "pipeline": {"series_idle_s": 2.0},
        "outputs": {"dir": str(out / "results"),
                    "report_threshold": "model" if opts.report_threshold is None else opts.report_threshold},
        "metrics": {"enabled": False},
    }, source="edge demo")
    service = EdgeService(config).start()
    try:
        yield f"runtime: Storage SCP CT_EDGE listening on 127.0.0.1:{service.scp_port}, model {model.name}"
        t1 = time.perf_counter()
        report = replay_cstore(files, "127.0.0.1", service.scp_port, called_ae="CT_EDGE", rate=opts.rate)
        sent = time.perf_counter() - t1
        failed = "; ".join(f"0x{st:04X} {comment}" for _uid, st, comment in report.failures[:3])
        yield (f"scanner -> runtime: C-STORE of {report.sent} files in {sent:.1f} s: {report.stored} stored, "
               f"{report.retries} retried after 'out of resources', {len(report.failures)} refused"
               + (f" ({failed})" if failed else ""))
        if not service.drain():
            raise EdgeError("edge demo: the runtime did not finish in time; see the log")
        elapsed = time.perf_counter() - t1
        latency = service.pipeline.latency.summary()
        counts = service.ledger.counts()
    finally:
        service.close()

    # 3. results
    from edge.outputs.jsonl import FINDINGS_FILE, SERIES_FILE, read_jsonl

    summaries = read_jsonl(out / "results" / SERIES_FILE)
    by_result = defaultdict(list)
    for f in read_jsonl(out / "results" / FINDINGS_FILE):
        by_result[f["result_id"]].append(f)
    n_slices = sum(s.get("n_slices", 0) for s in summaries)
    yield (f"runtime: {counts['processed']} instances processed, {counts['rejected']} rejected, "
           f"{n_slices} slices in {elapsed:.1f} s ({n_slices / max(elapsed, 1e-9):.1f} slices/s end to end)")
    from edge.outputs.exporter import report_threshold_for

    hits = misses = fps = 0
    thresholds = set()
    for s in summaries:
        threshold = report_threshold_for(opts.report_threshold, s.get("model_report_threshold"))
        thresholds.add(threshold)
        series = truth.get(s["series_uid"])
        findings = by_result[s["result_id"]]
        shown = [f for f in findings if f["probability"] >= threshold]
        yield (f"series {s['series_uid']}: {len(shown)} finding(s) at probability >= {threshold} "
               f"({len(findings)} candidates in findings.jsonl)")
        for f in shown:
            yield (f"  finding {f['index']}: ({f['x']:.1f}, {f['y']:.1f}, {f['z']:.1f}) mm, "
                   f"diameter {f['diameter_mm']:.1f} mm, probability {f['probability']:.2f}")
        if series is not None:
            for n in series.nodules:
                yield (f"  truth: ({n.center[0]:.1f}, {n.center[1]:.1f}, {n.center[2]:.1f}) mm, "
                       f"{n.diameter_mm:.1f} mm {n.kind} {n.location}")
            h, m, fp = _match(findings, series.nodules, threshold)
            hits, misses, fps = hits + h, misses + m, fps + fp
    at = " / ".join(f"{t:g}" for t in sorted(thresholds)) or "-"
    yield f"at probability >= {at}: {hits} nodule(s) found, {misses} missed, {fps} false positive(s)"
    for stage, st in latency.items():
        yield f"latency {stage}: p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.1f} ms (n={st['n']})"
    yield f"outputs: {out / 'results'} (findings.jsonl, series.jsonl, overlays/, sr/)"
