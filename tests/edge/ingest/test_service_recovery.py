"""The service as a real process: kill -9 mid-stream and restart (nothing lost, nothing twice); SIGTERM drain."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from ingest_helpers import Sphere, free_port, wait_until, write_series
from pynetdicom import AE

from edge.ingest.ledger import PROCESSED, Ledger
from edge.outputs.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[3]
CT = "1.2.840.10008.5.1.4.1.1.2"


def write_config(tmp_path, model, port, sr=False, idle=5.0) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f"""
[scp]
host = "127.0.0.1"
port = {port}
ae_title = "EDGE_TEST"

[storage]
state_dir = "state"

[model]
path = "{model}"
batch_size = 4

[pipeline]
series_idle_s = {idle}
reorder_timeout_s = 0.2
drain_timeout_s = 30

[outputs]
dir = "results"
sr = {'true' if sr else 'false'}

[metrics]
enabled = false

[logging]
level = "INFO"
""")
    return path


def start_service(config: Path) -> subprocess.Popen:
    """Start ``serve`` with its output in a log file next to the config; return once it listens."""
    log = config.parent / "service.log"
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.ingest.commands", "serve", "--config", str(config)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    proc.log_path = log
    proc.log_offset = offset
    assert wait_until(lambda: "listening" in output(proc) or proc.poll() is not None, timeout=60), output(proc)
    assert proc.poll() is None, output(proc)
    return proc


def output(proc) -> str:
    with open(proc.log_path) as f:
        f.seek(proc.log_offset)
        return f.read()


def associate(port):
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="EDGE_TEST")


def send(port, paths, stop_after=None, on_ack=None):
    """C-STORE ``paths`` in order; returns the SOP Instance UIDs answered 0x0000."""
    acked = []
    assoc = associate(port)
    assert assoc.is_established
    try:
        for p in paths:
            ds = pydicom.dcmread(p)
            status = assoc.send_c_store(ds)
            if status is None or "Status" not in status:
                break  # the service is gone
            if int(status.Status) == 0:
                acked.append(ds.SOPInstanceUID)
                if on_ack is not None and len(acked) == stop_after:
                    on_ack()
    finally:
        if assoc.is_established:
            assoc.release()
    return acked


def stop(proc: subprocess.Popen, timeout=30) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=timeout)
    return output(proc)


def test_kill_9_mid_stream_then_restart_loses_nothing_and_duplicates_nothing(tmp_path, blob_model):
    port = free_port()
    config = write_config(tmp_path, blob_model, port, idle=1.0)
    a = write_series(tmp_path / "a", n_slices=10, spheres=[Sphere(8.0, -6.0, 0.0)], seed=1)
    b = write_series(tmp_path / "b", n_slices=10, spheres=[Sphere(-10.0, 5.0, 2.0)], seed=2)
    ledger_path = tmp_path / "state" / "ledger.sqlite"

    proc = start_service(config)
    assert len(send(port, a.paths)) == 10
    ledger = Ledger(ledger_path)  # a second reader of the live WAL database
    assert wait_until(lambda: ledger.counts()["processed"] == 10, timeout=20)  # series A committed
    acked_b = send(port, b.paths, stop_after=4, on_ack=lambda: os.kill(proc.pid, signal.SIGKILL))
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked_b) >= 4
    # every acknowledged instance is final in the ledger or waiting in the spool
    spooled = {p.stem for p in (tmp_path / "state" / "spool").glob("*.dcm")}
    final = {e.key for e in ledger.entries(PROCESSED)}
    assert set(a.sop_uids) <= final
    assert set(acked_b) <= final | spooled

    # restart; the scanner sends everything again (already stored instances are duplicates)
    proc = start_service(config)
    assert set(send(port, a.paths + b.paths)) == set(a.sop_uids + b.sop_uids)
    out = stop(proc)
    assert proc.returncode == 0, out
    assert "queued again" in out  # the spooled part of B was replayed

    entries = ledger.entries()
    ledger.close()
    assert sorted(e.key for e in entries) == sorted(a.sop_uids + b.sop_uids)
    assert {e.state for e in entries} == {PROCESSED}
    summaries = read_jsonl(tmp_path / "results" / "series.jsonl")
    per_instance = Counter(uid for s in summaries for uid in s["sop_instance_uids"])
    assert set(per_instance) == set(a.sop_uids + b.sop_uids)
    assert set(per_instance.values()) == {1}  # exactly one set of results per instance
    assert len({s["result_id"] for s in summaries}) == len(summaries)
    findings = read_jsonl(tmp_path / "results" / "findings.jsonl")
    assert len({(f["result_id"], f["index"]) for f in findings}) == len(findings)
    assert {f["result_id"] for f in findings} <= {s["result_id"] for s in summaries}
    assert not list((tmp_path / "state" / "spool").glob("*.dcm"))
    assert not list((tmp_path / "state" / "spool" / ".tmp").iterdir())


def test_sigterm_drains_gracefully(tmp_path, blob_model):
    pytest.importorskip("highdicom")
    port = free_port()
    config = write_config(tmp_path, blob_model, port, sr=True, idle=60.0)
    series = write_series(tmp_path / "in", n_slices=8, spheres=[Sphere(8.0, -6.0, 0.0)])
    proc = start_service(config)
    acked = send(port, series.paths)
    assert len(acked) == 8
    t0 = time.monotonic()
    out = stop(proc)  # the series is still open (60 s idle): the drain must close and commit it
    assert proc.returncode == 0, out
    assert time.monotonic() - t0 < 20
    assert "drained: 8 processed, 0 rejected, 0 still received" in out
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    assert ledger.counts() == {"received": 0, "processed": 8, "rejected": 0}
    assert ledger.results(exported=False) == []
    ledger.close()
    (summary,) = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert summary["closed_reason"] == "drain" and summary["sr"]
    sr = pydicom.dcmread(tmp_path / "results" / summary["sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
