"""The watched folder: stable files are taken into the spool and removed; nothing is lost when full."""

import pytest
from ingest_helpers import write_series

from edge.config import PipelineConfig
from edge.ingest.intake import Intake
from edge.ingest.ledger import RECEIVED, REJECTED, Ledger
from edge.ingest.pipeline import Pipeline, PipelineSink
from edge.ingest.spool import Spool
from edge.ingest.watch import FolderWatcher
from edge.model_file import ModelSpecs


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture()
def setup(tmp_path, blob_runner):
    specs = ModelSpecs.from_metadata(blob_runner.custom_metadata())
    pipeline = Pipeline(blob_runner, specs, PipelineConfig(max_in_flight=4, series_idle_s=60), PipelineSink()).start()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    spool = Spool(tmp_path / "spool", tmp_path / "rejected")
    intake = Intake(ledger, spool, pipeline)
    clock = Clock()
    watcher = FolderWatcher(tmp_path / "incoming", intake, poll_interval_s=0.1, stable_s=2.0, clock=clock)
    yield watcher, clock, ledger, spool, pipeline
    pipeline.stop()


def test_a_file_is_taken_once_its_size_is_stable(setup, tmp_path):
    watcher, clock, ledger, spool, _ = setup
    series = write_series(tmp_path / "src", n_slices=1)
    target = watcher.folder / "scan" / "IM1"
    target.parent.mkdir()
    data = series.paths[0].read_bytes()
    target.write_bytes(data[:1000])  # the scanner is still writing
    assert watcher.poll_once() == 0
    clock.now = 1.5
    target.write_bytes(data)
    assert watcher.poll_once() == 0  # it grew: the stable time starts again
    clock.now = 3.0
    assert watcher.poll_once() == 0
    clock.now = 3.6
    assert watcher.poll_once() == 1
    assert not target.exists()
    entry = ledger.get(series.sop_uids[0])
    assert entry.state == RECEIVED and entry.source == "watch"
    assert [p.name for p in spool.files()] == [series.sop_uids[0] + ".dcm"]


def test_files_wait_in_the_folder_while_the_pipeline_is_full(setup, tmp_path):
    watcher, clock, ledger, spool, pipeline = setup
    series = write_series(tmp_path / "src", n_slices=2)
    for p in series.paths:
        (watcher.folder / p.name).write_bytes(p.read_bytes())
    slots = 0
    while pipeline.try_admit():  # occupy every admission slot
        slots += 1
    watcher.poll_once()
    clock.now = 10.0
    assert watcher.poll_once() == 0
    assert sorted(p.name for p in watcher.folder.iterdir()) == ["IM0001.dcm", "IM0002.dcm"]
    assert ledger.counts()[RECEIVED] == 0
    for _ in range(slots):
        pipeline.release()
    clock.now = 11.0
    assert watcher.poll_once() == 2
    assert not list(watcher.folder.iterdir())
    assert ledger.counts()[RECEIVED] == 2


def test_broken_and_duplicate_files_are_settled_and_removed(setup, tmp_path):
    watcher, clock, ledger, spool, _ = setup
    series = write_series(tmp_path / "src", n_slices=1)
    (watcher.folder / "garbage.dcm").write_bytes(b"\x00" * 300)
    (watcher.folder / "copy1").write_bytes(series.paths[0].read_bytes())
    (watcher.folder / "copy2").write_bytes(series.paths[0].read_bytes())
    (watcher.folder / ".hidden").write_bytes(b"x")
    (watcher.folder / "writing.part").write_bytes(b"x")
    watcher.stable_s = 0.0
    assert watcher.poll_once() == 3
    assert sorted(p.name for p in watcher.folder.iterdir()) == [".hidden", "writing.part"]
    rejected = ledger.entries(REJECTED)
    assert len(rejected) == 1 and rejected[0].key.startswith("file:")
    assert len(list((tmp_path / "rejected").iterdir())) == 1
    assert ledger.counts()[RECEIVED] == 1  # the copy was a duplicate by SOP Instance UID


def test_the_watcher_thread_runs_and_stops(setup, tmp_path):
    watcher, clock, ledger, _, _ = setup
    watcher.clock = __import__("time").monotonic
    watcher.stable_s = 0.0
    series = write_series(tmp_path / "src", n_slices=1)
    (watcher.folder / "a").write_bytes(series.paths[0].read_bytes())
    watcher.start()
    from ingest_helpers import wait_until

    assert wait_until(lambda: ledger.counts()[RECEIVED] == 1, timeout=5)
    watcher.stop()
