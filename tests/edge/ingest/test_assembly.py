"""SeriesAssembly: out-of-order arrivals streamed in InstanceNumber order, gaps, localizers, the reorder fallback."""

import dataclasses
import random

import numpy as np
import pytest
from ingest_helpers import Sphere, sphere_hits, write_series

from edge.detector import SeriesDetector
from edge.dicom import read_frame, read_frames
from edge.ingest.assembly import PreparedInstance, PreparedSlice, SeriesAssembly
from edge.ingest.streaming import StreamingSeriesDetector
from edge.model_file import ModelSpecs
from edge.preprocess.cpu import CpuPreprocessor

SPHERES = [Sphere(8.0, -6.0, -6.0), Sphere(-12.0, 9.0, 8.0, 5.0)]
N = 16


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_series(tmp_path_factory.mktemp("series"), n_slices=N, spheres=SPHERES, seed=5)


@pytest.fixture(scope="module")
def frames(series):
    return [read_frame(p) for p in series.paths]


@pytest.fixture()
def specs(blob_runner):
    return ModelSpecs.from_metadata(blob_runner.custom_metadata())


@pytest.fixture()
def offline(blob_runner, specs, frames):
    return SeriesDetector(blob_runner, specs).detect(frames)


@pytest.fixture()
def make(blob_runner, specs):
    preprocessor = CpuPreprocessor(specs.preprocess)

    def planes(frame):
        return preprocessor.preprocess_frame(frame)

    def reload(path):
        return {f.frame_index: planes(f) for f in read_frames(path) if not f.is_localizer}

    def instance(frame, path=None, number="same", localizer=False):
        number = frame.instance_number if number == "same" else number
        s = PreparedSlice(frame.frame_index, frame.geometry, None if localizer else planes(frame), localizer)
        return PreparedInstance(frame.sop_uid, frame.sop_uid, frame.study_uid, frame.series_uid, number, [s],
                                path=None if path is None else str(path))

    def assembly(clock, **kw):
        a = SeriesAssembly("study", "series", lambda: StreamingSeriesDetector(blob_runner, specs, batch_size=2),
                           reload=reload, clock=clock, **kw)
        return a

    return instance, assembly


def same_findings(a, b):
    key = lambda f: (round(f.x, 3), round(f.y, 3), round(f.z, 3), round(f.diameter_mm, 3), round(f.probability, 5))
    return sorted(map(key, a)) == sorted(map(key, b))


def test_arrivals_shuffled_within_the_window_stream_to_the_offline_result(make, frames, offline):
    instance, assembly = make
    clock = Clock()
    a = assembly(clock, reorder_timeout_s=5.0)
    order = list(range(N))
    rng = random.Random(0)
    for start in range(0, N, 4):  # shuffled in blocks of 4, as 4 associations would deliver them
        block = order[start:start + 4]
        rng.shuffle(block)
        order[start:start + 4] = block
    streamed_before_close = []
    for i in order:
        clock.now += 0.01
        streamed_before_close += a.add(instance(frames[i]))
        streamed_before_close += a.run_ready()
    outcome = a.close("end")
    assert outcome.streamed and outcome.gaps_skipped == 0
    assert same_findings(outcome.findings, offline)
    assert len(sphere_hits(outcome.findings, SPHERES, tol_mm=2.5)) == 2
    assert streamed_before_close  # the first sphere was reported before the series was complete
    assert [m.instance_number for m in outcome.members] == list(range(1, N + 1))
    assert sorted(outcome.processed_keys) == sorted(f.sop_uid for f in frames)


def test_the_run_waits_for_instance_1(make, frames):
    instance, assembly = make
    clock = Clock()
    a = assembly(clock, reorder_timeout_s=5.0)
    for i in (3, 2, 1):
        a.add(instance(frames[i]))
    assert a.n_pending == 3  # nothing pushed: the start of the run is unknown
    a.add(instance(frames[0]))
    assert a.n_pending == 0


def test_the_run_starts_at_the_lowest_number_after_the_reorder_timeout(make, frames, blob_runner, specs):
    instance, assembly = make
    clock = Clock()
    a = assembly(clock, reorder_timeout_s=1.0)
    for f in frames[2:6]:
        a.add(instance(f))
    assert a.n_pending == 4
    clock.now += 1.5
    a.poll()
    assert a.n_pending == 0
    outcome = a.close()
    assert [m.instance_number for m in outcome.members] == [3, 4, 5, 6]


def test_a_missing_instance_is_skipped_after_the_timeout(make, frames, blob_runner, specs):
    instance, assembly = make
    clock = Clock()
    a = assembly(clock, reorder_timeout_s=1.0)
    for i, f in enumerate(frames):
        if i != 6:
            a.add(instance(f))
    assert a.n_pending == N - 7  # everything after the gap waits
    clock.now += 0.5
    a.poll()
    assert a.n_pending == N - 7
    clock.now += 0.6
    a.poll()
    assert a.n_pending == 0
    outcome = a.close()
    assert outcome.streamed and outcome.gaps_skipped == 1
    assert 7 not in [m.instance_number for m in outcome.members]
    without = SeriesDetector(blob_runner, specs).detect(frames[:6] + frames[7:])
    assert same_findings(outcome.findings, without)


def test_max_pending_bounds_the_wait(make, frames):
    instance, assembly = make
    a = assembly(Clock(), reorder_timeout_s=100.0, max_pending=3)
    a.add(instance(frames[0]))
    for f in frames[2:7]:
        a.add(instance(f))
        assert a.n_pending <= 3


def test_localizers_are_dropped_and_their_number_does_not_block(make, frames, offline):
    instance, assembly = make
    a = assembly(Clock(), reorder_timeout_s=100.0)
    scout = dataclasses.replace(frames[0], sop_uid="1.2.3.999", instance_number=1)
    a.add(instance(scout, localizer=True))
    for f in frames:
        a.add(instance(dataclasses.replace(f, instance_number=f.instance_number + 1)))
    assert a.n_pending == 0
    outcome = a.close()
    assert outcome.streamed
    assert "1.2.3.999" not in outcome.processed_keys
    assert same_findings(outcome.findings, offline)


def test_a_late_instance_falls_back_to_reordering_at_close(make, series, frames, offline):
    instance, assembly = make
    clock = Clock()
    a = assembly(clock, reorder_timeout_s=0.5)
    for i, (f, p) in enumerate(zip(frames, series.paths)):
        if i != 5:
            a.add(instance(f, p))
    clock.now += 1.0
    a.poll()  # instance 6 given up on
    a.add(instance(frames[5], series.paths[5]))  # ... and then it arrives
    assert not a.streaming and "after its turn" in a.fallback_reason
    outcome = a.close()
    assert not outcome.streamed
    assert same_findings(outcome.findings, offline)
    assert [m.instance_number for m in outcome.members] == list(range(1, N + 1))


def test_numbers_that_do_not_follow_the_positions_fall_back(make, series, frames, offline):
    instance, assembly = make
    a = assembly(Clock(), reorder_timeout_s=100.0)
    numbers = list(range(1, N + 1))
    random.Random(1).shuffle(numbers)
    for f, p, n in zip(frames, series.paths, numbers):
        a.add(instance(f, p, number=n))
    outcome = a.close()
    assert not outcome.streamed and "out of order" in outcome.fallback_reason
    assert same_findings(outcome.findings, offline)
    locations = [m.location for m in outcome.members]
    assert locations == sorted(locations)


def test_missing_instance_numbers_fall_back(make, series, frames, offline):
    instance, assembly = make
    a = assembly(Clock())
    for f, p in zip(frames[::-1], series.paths[::-1]):
        a.add(instance(f, p, number=None))
    outcome = a.close()
    assert not outcome.streamed and "InstanceNumber" in outcome.fallback_reason
    assert same_findings(outcome.findings, offline)


def test_an_instance_of_another_size_is_rejected_alone(make, frames, blob_runner, specs):
    instance, assembly = make
    a = assembly(Clock(), reorder_timeout_s=0.0)
    odd = dataclasses.replace(frames[3], geometry=dataclasses.replace(frames[3].geometry, rows=48),
                              pixels=np.zeros((48, 64), np.int16))
    for i, f in enumerate(frames):
        a.add(instance(odd if i == 3 else f))
    outcome = a.close()
    assert outcome.streamed
    assert [k for k, _ in outcome.rejected] == [frames[3].sop_uid]
    assert "does not fit" in outcome.rejected[0][1]
    assert frames[3].sop_uid not in outcome.processed_keys
    assert len(outcome.members) == N - 1


def test_too_few_slices_rejects_the_series(make, frames):
    instance, assembly = make
    a = assembly(Clock(), min_slices=3)
    a.add(instance(frames[0]))
    a.add(instance(frames[1]))
    outcome = a.close()
    assert outcome.processed_keys == [] and outcome.findings == []
    assert len(outcome.rejected) == 2 and "at least 3" in outcome.rejected[0][1]


def test_the_same_instance_twice_is_taken_once(make, frames):
    instance, assembly = make
    a = assembly(Clock())
    for f in frames[:4] + frames[:4]:
        a.add(instance(f))
    outcome = a.close()
    assert len(outcome.members) == 4 and outcome.streamed
