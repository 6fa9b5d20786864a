"""The Storage SCP end to end on loopback: pynetdicom SCU and dcmtk storescu in, ledger and results out."""

import logging
import shutil
import subprocess
import threading
import urllib.request

import pytest
from ingest_helpers import (
    BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    Sphere,
    ct_dataset,
    enhanced_ct_dataset,
    free_port,
    render_slice,
    wait_until,
    write_series,
)
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE

from edge.config import config_from_dict
from edge.ingest.ledger import PROCESSED, REJECTED
from edge.ingest.replay import replay_cstore
from edge.ingest.service import EdgeService
from edge.metrics import parse_samples
from edge.outputs.jsonl import read_jsonl

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def make_config(tmp_path, model, **sections):
    data = {
        "scp": {"host": "127.0.0.1", "port": free_port(), "ae_title": "EDGE_TEST"},
        "storage": {"state_dir": str(tmp_path / "state")},
        "model": {"path": str(model), "batch_size": 4},
        "pipeline": {"series_idle_s": 0.4, "reorder_timeout_s": 0.2, "max_in_flight": 16},
        "outputs": {"dir": str(tmp_path / "results"), "sr": False},
        "metrics": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data, source="test.toml")


@pytest.fixture()
def service_factory(tmp_path, blob_model):
    started = []

    def make(**sections):
        service = EdgeService(make_config(tmp_path, blob_model, **sections)).start()
        started.append(service)
        return service

    yield make
    for s in started:
        if s._started:
            s.drain(timeout=10)
            s.close()


def scu_association(port, calling="SCANNER", called="EDGE_TEST"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT)
    ae.add_requested_context(ENHANCED_CT)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    return assoc


def wait_final(service, n, timeout=20):
    """Until ``n`` instances have a final state, nothing is pending and the outputs are written."""
    def done():
        counts = service.ledger.counts()
        return (counts["processed"] + counts["rejected"] >= n and counts["received"] == 0
                and service.pipeline.is_idle())

    return wait_until(done, timeout)


def test_series_over_pynetdicom_is_spooled_processed_and_found(service_factory, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    service = service_factory(metrics={"enabled": True, "port": free_port()})
    series = write_series(tmp_path / "in", n_slices=14, spheres=[Sphere(8.0, -6.0, 0.0)])
    report = replay_cstore(series.paths, "127.0.0.1", service.scp_port, called_ae="EDGE_TEST", calling_ae="SCANNER")
    assert report.stored == 14 and not report.failures
    assert wait_final(service, 14)
    entries = service.ledger.entries()
    assert {e.key for e in entries} == set(series.sop_uids)
    assert {e.state for e in entries} == {PROCESSED}
    (summary,) = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert sorted(summary["sop_instance_uids"]) == sorted(series.sop_uids)
    findings = read_jsonl(tmp_path / "results" / "findings.jsonl")
    assert len(findings) == 1
    f = findings[0]
    assert abs(f["x"] - 8.0) < 2.5 and abs(f["y"] + 6.0) < 2.5 and abs(f["z"]) < 2.5
    assert (tmp_path / "results" / f["overlay"]).is_file()
    # metrics and health over HTTP
    base = f"http://127.0.0.1:{service.metrics_server.port}"
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
        assert r.status == 200 and b"14 processed" in r.read()
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        samples = {(n, tuple(sorted(l.items()))): v for n, l, v in parse_samples(r.read().decode())}
    assert samples[("ct_edge_instances_received_total", (("source", "scp"),))] == 14
    assert samples[("ct_edge_instances_processed_total", ())] == 14
    assert samples[("ct_edge_stage_latency_seconds_count", (("stage", "infer"),))] == 14
    # spool emptied after the commit; nothing identifying in outputs or logs
    assert not list((tmp_path / "state" / "spool").glob("*.dcm"))
    text = (tmp_path / "results" / "series.jsonl").read_text() + (tmp_path / "results" / "findings.jsonl").read_text()
    text += caplog.text
    for secret in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "SECRET"):
        assert secret not in text


def test_bad_instances_are_rejected_with_reasons_while_good_ones_go_through(service_factory, tmp_path):
    service = service_factory()
    series = write_series(tmp_path / "in", n_slices=6)
    assoc = scu_association(service.scp_port)
    assert assoc.is_established
    import pydicom

    statuses = {}
    try:
        for p in series.paths[:3]:
            statuses[p.name] = assoc.send_c_store(pydicom.dcmread(p))
        # labelled CT, but the dataset says MR
        mr = ct_dataset(render_slice(0, [], __import__("numpy").random.default_rng(0)), 50.0, 99,
                        series.study_uid, series.series_uid, series.frame_of_reference_uid, Modality="MR")
        statuses["mr"] = assoc.send_c_store(mr)
        # no ImagePositionPatient: cannot be placed in patient space
        nogeo = pydicom.dcmread(series.paths[3])
        nogeo.SOPInstanceUID = nogeo.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        del nogeo.ImagePositionPatient
        statuses["nogeo"] = assoc.send_c_store(nogeo)
        # truncated pixel data
        short = pydicom.dcmread(series.paths[4])
        short.SOPInstanceUID = short.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        short.PixelData = short.PixelData[:100]
        statuses["short"] = assoc.send_c_store(short)
        for p in series.paths[3:]:
            statuses[p.name] = assoc.send_c_store(pydicom.dcmread(p))
    finally:
        assoc.release()
    codes = {k: int(v.Status) for k, v in statuses.items()}
    assert codes["mr"] == 0xA900
    assert codes["nogeo"] == 0xC000 and codes["short"] == 0xC000
    assert "ImagePositionPatient" in str(statuses["nogeo"].ErrorComment)
    assert all(codes[p.name] == 0 for p in series.paths)
    assert wait_final(service, 9)
    rejected = {e.key: e.reason for e in service.ledger.entries(REJECTED)}
    assert len(rejected) == 3
    assert any("not CT" in r for r in rejected.values())
    assert any("ImagePositionPatient" in r for r in rejected.values())
    assert {e.key for e in service.ledger.entries(PROCESSED)} == set(series.sop_uids)
    # rejected instances are kept for inspection, named by UID
    assert len(list((tmp_path / "state" / "rejected").glob("*.dcm"))) == 3
    # sending a rejected instance again gets the same answer; a processed one is a duplicate
    assoc = scu_association(service.scp_port)
    try:
        assert int(assoc.send_c_store(mr).Status) == 0xA900
        assert int(assoc.send_c_store(pydicom.dcmread(series.paths[0])).Status) == 0
    finally:
        assoc.release()
    assert service.ledger.counts() == {"received": 0, "processed": 6, "rejected": 3}


def test_an_enhanced_ct_instance_is_one_series(service_factory, tmp_path):
    service = service_factory()
    ds = enhanced_ct_dataset(n_frames=12, spheres=[Sphere(-9.0, 6.0, 1.0)])
    assoc = scu_association(service.scp_port)
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    assert wait_final(service, 1)
    assert service.ledger.get(ds.SOPInstanceUID).state == PROCESSED
    (summary,) = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert summary["n_instances"] == 1 and summary["n_slices"] == 12 and summary["streamed"]
    (finding,) = read_jsonl(tmp_path / "results" / "findings.jsonl")
    assert abs(finding["x"] + 9.0) < 2.5 and abs(finding["y"] - 6.0) < 2.5 and abs(finding["z"] - 1.0) < 2.5
    assert finding["key_sop_instance_uid"] == ds.SOPInstanceUID and 0 <= finding["key_frame_index"] < 12


def test_calling_ae_not_on_the_allowlist_is_refused(service_factory, tmp_path):
    service = service_factory(scp={"allowed_calling_ae_titles": ["SCANNER"]})
    assoc = scu_association(service.scp_port, calling="INTRUDER")
    assert not assoc.is_established  # rejected (or, racing the socket close, seen as aborted)
    assoc = scu_association(service.scp_port, calling="SCANNER")
    assert assoc.is_established
    assoc.release()


def test_four_concurrent_associations(service_factory, tmp_path):
    service = service_factory(scp={"maximum_associations": 4})
    a = write_series(tmp_path / "a", n_slices=10, spheres=[Sphere(8.0, -6.0, 0.0)], seed=1)
    b = write_series(tmp_path / "b", n_slices=10, spheres=[Sphere(-10.0, 5.0, 2.0)], seed=2)
    active = []
    gate = threading.Barrier(4, timeout=10)
    orig = service.intake.offer_dataset

    def counting_offer(*args, **kwargs):  # observe the concurrency inside the SCP
        active.append(service.scp.active_associations())
        return orig(*args, **kwargs)

    service.intake.offer_dataset = counting_offer
    files = a.paths + b.paths
    reports = [None] * 4

    def send(i):
        gate.wait()
        reports[i] = replay_cstore(files[i::4], "127.0.0.1", service.scp_port, called_ae="EDGE_TEST")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(r.stored for r in reports) == 20
    assert max(active) >= 2
    assert wait_final(service, 20)
    assert service.ledger.counts()["processed"] == 20
    summaries = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert sorted(s["series_uid"] for s in summaries) == sorted([a.series_uid, b.series_uid])
    # slices arrived interleaved and out of order, yet each series was streamed and found its sphere
    findings = read_jsonl(tmp_path / "results" / "findings.jsonl")
    assert {f["series_uid"] for f in findings} == {a.series_uid, b.series_uid}


def test_backpressure_answers_out_of_resources_and_the_retry_succeeds(service_factory, tmp_path):
    service = service_factory(pipeline={"max_in_flight": 2, "infer_queue": 1})
    series = write_series(tmp_path / "in", n_slices=12)
    gate = threading.Event()
    runner_infer = service.runner.infer

    def blocked_infer(feed):  # inference stalls until the SCP has refused at least once
        gate.wait(20)
        return runner_infer(feed)

    service.runner.infer = blocked_infer
    reports = []
    sender = threading.Thread(target=lambda: reports.append(replay_cstore(
        series.paths, "127.0.0.1", service.scp_port, called_ae="EDGE_TEST", retry_delay_s=0.05)))
    sender.start()

    def refusals():
        samples = {name: value for name, _, value in parse_samples(service.metrics.render().decode())}
        return samples["ct_edge_out_of_resources_total"]

    assert wait_until(lambda: refusals() > 0, timeout=20)
    # bounded: while inference is stalled at most max_in_flight + infer_queue + a batch are held
    assert service.ledger.counts()["received"] <= 2 + 1 + 4 + 1
    gate.set()
    sender.join(30)
    (report,) = reports
    assert report.retries == refusals() > 0
    assert report.stored == 12 and not report.failures
    assert wait_final(service, 12, timeout=30)
    assert service.ledger.counts() == {"received": 0, "processed": 12, "rejected": 0}
    (summary,) = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert sorted(summary["sop_instance_uids"]) == sorted(series.sop_uids)


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed (.ci/run installs it)")
def test_series_over_dcmtk_storescu(service_factory, tmp_path):
    service = service_factory()
    series = write_series(tmp_path / "in", n_slices=8)
    result = subprocess.run(
        ["storescu", "-aet", "DCMTK", "-aec", "EDGE_TEST", "127.0.0.1", str(service.scp_port),
         *[str(p) for p in series.paths]],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert wait_final(service, 8)
    assert {e.key for e in service.ledger.entries(PROCESSED)} == set(series.sop_uids)
    assert len(read_jsonl(tmp_path / "results" / "series.jsonl")) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_association(service_factory, tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    service = service_factory(scp={"tls": {"enabled": True, "certificate": str(cert), "private_key": str(key)}})
    series = write_series(tmp_path / "in", n_slices=4)
    plain = scu_association(service.scp_port)
    assert not plain.is_established
    client = ssl.create_default_context(cafile=str(cert))
    report = replay_cstore(series.paths, "127.0.0.1", service.scp_port, called_ae="EDGE_TEST", ssl_context=client)
    assert report.stored == 4
    assert wait_final(service, 4)
    assert service.ledger.counts()["processed"] == 4
