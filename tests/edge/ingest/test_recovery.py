"""Restart recovery in process: every state a crash can leave in the spool and ledger is settled once."""

import pytest
from ingest_helpers import write_series

from edge.config import PipelineConfig
from edge.decode.findings import Finding
from edge.ingest.assembly import Member, SeriesOutcome
from edge.ingest.intake import Intake
from edge.ingest.ledger import PROCESSED, RECEIVED, REJECTED, Ledger
from edge.ingest.pipeline import Pipeline, PipelineSink
from edge.ingest.results import ResultStore
from edge.ingest.spool import Spool
from edge.model_file import ModelSpecs
from edge.outputs.exporter import SeriesExporter
from edge.outputs.jsonl import read_jsonl


class Recorder(PipelineSink):
    def __init__(self):
        self.commits = []

    def commit(self, outcome):
        self.commits.append(outcome)


def test_spool_recovery_requeues_exactly_the_unfinished(tmp_path, blob_runner):
    series = write_series(tmp_path / "src", n_slices=6)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    spool = Spool(tmp_path / "spool", tmp_path / "rejected")
    uids, paths = series.sop_uids, series.paths
    # 0, 1: spooled and received (the normal crash case)
    for i in (0, 1):
        p = spool.write(uids[i], paths[i].read_bytes())
        ledger.receive(uids[i], spool_path=str(p))
    # 2: spooled, crash before the ledger insert
    spool.write(uids[2], paths[2].read_bytes())
    # 3: processed and exported, crash before its spool file was deleted
    p = spool.write(uids[3], paths[3].read_bytes())
    ledger.receive(uids[3], spool_path=str(p))
    stored = ledger.commit_series(series.study_uid, series.series_uid, {"sources": {}}, [uids[3]])
    ledger.mark_exported(stored["result_id"])
    # 4: rejected, crash before the quarantine move
    p = spool.write(uids[4], paths[4].read_bytes())
    ledger.receive(uids[4], spool_path=str(p))
    ledger.reject(uids[4], "bad")
    # 5: received but its spool file is gone (deleted by hand)
    ledger.receive(uids[5], spool_path=str(tmp_path / "spool" / "gone.dcm"))
    # a write interrupted before its rename
    (spool.tmp_dir / ".x.dcm.1.tmp").write_bytes(b"half")

    specs = ModelSpecs.from_metadata(blob_runner.custom_metadata())
    sink = Recorder()
    pipeline = Pipeline(blob_runner, specs, PipelineConfig(series_idle_s=60, min_slices=1), sink).start()
    try:
        intake = Intake(ledger, spool, pipeline)
        assert intake.recover() == 3
        assert pipeline.close_all(timeout=20)
    finally:
        pipeline.stop()
    (outcome,) = sink.commits
    assert sorted(outcome.processed_keys) == sorted(uids[:3])
    assert ledger.get(uids[2]).state == RECEIVED  # adopted into the ledger (the sink here does not commit)
    assert ledger.get(uids[5]).state == REJECTED and "missing" in ledger.get(uids[5]).reason
    assert not (tmp_path / "spool" / f"{uids[3]}.dcm").exists()
    assert (tmp_path / "rejected" / f"{uids[4]}.dcm").exists()
    assert not list(spool.tmp_dir.iterdir())


def outcome_for(series, paths=None):
    paths = paths or series.paths
    members = [Member(u, u, 0, i + 1, float(i), str(p)) for i, (u, p) in enumerate(zip(series.sop_uids, paths))]
    finding = Finding(x=8.0, y=-6.0, z=1.0, diameter_mm=7.0, probability=0.9, max_score=0.9, n_slices=3,
                      z_extent_mm=4.0, first_slice_location=0.0, last_slice_location=2.0, key_slice_location=1.0)
    return SeriesOutcome(series.study_uid, series.series_uid, [finding], members, list(series.sop_uids), [],
                         "idle", True)


@pytest.mark.parametrize("crash", ["before_export", "mid_jsonl", "before_mark"])
def test_committed_results_are_exported_exactly_once_after_a_crash(tmp_path, crash):
    series = write_series(tmp_path / "src", n_slices=3)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    spool = Spool(tmp_path / "spool")
    spooled = [spool.write(u, p.read_bytes()) for u, p in zip(series.sop_uids, series.paths)]
    for u, p in zip(series.sop_uids, spooled):
        ledger.receive(u, spool_path=str(p))
    out = tmp_path / "results"

    class Crash(Exception):
        pass

    exporter = SeriesExporter(out, sr=False)
    mark = ledger.mark_exported
    if crash == "before_export":
        exporter.export = lambda report, recovering=False: (_ for _ in ()).throw(Crash())
    elif crash == "before_mark":  # everything written, the kill comes before the ledger notes it
        ledger.mark_exported = lambda result_id: (_ for _ in ()).throw(Crash())
    else:
        real_append = exporter.jsonl._append

        def torn_append(path, objects):  # the findings line is half written, then the process dies
            if path.name == "findings.jsonl":
                with open(path, "a") as f:
                    f.write('{"type":"finding","result_id":"torn')
            raise Crash()

        exporter.jsonl._append = torn_append
    store = ResultStore(ledger, spool, exporter)
    with pytest.raises(Crash):
        store.commit(outcome_for(series, [str(p) for p in spooled]))
    assert {e.state for e in ledger.entries()} == {PROCESSED}
    assert len(ledger.results(exported=False)) == 1

    # restart: a fresh exporter (which cuts the torn line) and the recovery
    ledger.mark_exported = mark
    store = ResultStore(ledger, spool, SeriesExporter(out, sr=False))
    assert store.recover() == 1
    assert store.recover() == 0
    summaries = read_jsonl(out / "series.jsonl")
    findings = read_jsonl(out / "findings.jsonl")
    assert len(summaries) == 1 and len(findings) == 1
    assert findings[0]["result_id"] == summaries[0]["result_id"]
    assert (out / findings[0]["overlay"]).is_file()
    assert not list(spool.files())


def _received_series(tmp_path):
    """A 3-slice series whose instances the ledger has received, and a result store without outputs."""
    series = write_series(tmp_path / "src", n_slices=3)
    ledger = Ledger(":memory:")
    for u in series.sop_uids:
        ledger.receive(u)
    return series, ledger, ResultStore(ledger, Spool(tmp_path / "spool"), None)


def test_a_second_result_for_finished_instances_is_not_committed(tmp_path):
    """An instance queued twice (a restart racing a resend) must not get a second set of results."""
    series, ledger, store = _received_series(tmp_path)
    first = store.commit(outcome_for(series))
    assert first is not None
    assert store.commit(outcome_for(series)) is None
    assert len(ledger.results()) == 1
    ledger.receive("9.9.9")
    mixed = outcome_for(series)
    mixed.processed_keys.append("9.9.9")
    second = store.commit(mixed)
    (payload,) = ledger.results(series_uid=series.series_uid, exported=True)[1:]
    assert payload["result_id"] == second and payload["sop_instance_uids"] == []
    assert ledger.get("9.9.9").result_id == second


def test_the_committed_result_records_its_models_report_threshold(tmp_path):
    """Recovery re-exports with the threshold of the model that made the result, not today's model."""
    series, ledger, store = _received_series(tmp_path)
    outcome = outcome_for(series)
    outcome.report_threshold = 0.42
    store.commit(outcome)
    (payload,) = ledger.results(series_uid=series.series_uid)
    assert payload["report_threshold"] == 0.42
