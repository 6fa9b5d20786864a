"""StreamingSeriesDetector: same findings as the offline SeriesDetector, emitted while the series arrives."""

import dataclasses

import numpy as np
import pytest
from ingest_helpers import Sphere, sphere_hits, write_series

from edge.detector import SeriesDetector
from edge.dicom import read_frame
from edge.ingest.streaming import SliceOrderError, StreamingSeriesDetector
from edge.model_file import ModelSpecs

SPHERES = [Sphere(8.0, -6.0, -8.0), Sphere(-15.0, 10.0, 10.0, 5.0)]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    series = write_series(tmp_path_factory.mktemp("series"), n_slices=18, spheres=SPHERES, seed=3)
    return [read_frame(p) for p in series.paths]


@pytest.fixture()
def specs(blob_runner):
    return ModelSpecs.from_metadata(blob_runner.custom_metadata())


def stream(runner, specs, frames, batch_size=4, idle_every=None):
    detector = StreamingSeriesDetector(runner, specs, batch_size=batch_size)
    emitted = []  # (push index, finding)
    for i, f in enumerate(frames):
        emitted += [(i, x) for x in detector.push_frame(f)]
        if idle_every and i % idle_every == 0:
            emitted += [(i, x) for x in detector.run_ready()]
    emitted += [(len(frames), x) for x in detector.close()]
    return detector, emitted


@pytest.mark.parametrize("batch_size,idle_every", [(4, None), (1, None), (3, 2)])
def test_same_findings_as_the_offline_detector(blob_runner, specs, frames, batch_size, idle_every):
    offline = SeriesDetector(blob_runner, specs, batch_size=4).detect(frames)
    _, emitted = stream(blob_runner, specs, frames, batch_size, idle_every)
    streamed = [f for _, f in emitted]
    assert len(offline) == 2
    assert len(sphere_hits(offline, SPHERES, tol_mm=2.5)) == 2
    assert len(streamed) == len(offline)
    for a, b in zip(sorted(streamed, key=lambda f: f.z), sorted(offline, key=lambda f: f.z)):
        for field in dataclasses.fields(a):
            assert getattr(a, field.name) == pytest.approx(getattr(b, field.name), abs=1e-4)


def test_descending_slice_order_gives_the_same_findings(blob_runner, specs, frames):
    up = [f for _, f in stream(blob_runner, specs, frames)[1]]
    down = [f for _, f in stream(blob_runner, specs, frames[::-1])[1]]
    assert sorted((round(f.x, 3), round(f.y, 3), round(f.z, 3)) for f in up) == \
        sorted((round(f.x, 3), round(f.y, 3), round(f.z, 3)) for f in down)


def test_a_finding_is_emitted_as_soon_as_its_nodule_has_ended(blob_runner, specs, frames):
    _, emitted = stream(blob_runner, specs, frames, batch_size=1)
    lower = [i for i, f in emitted if f.z < 0]
    assert len(lower) == 1
    # the lower sphere ends around z = -1 mm (slice 8 of 18): found long before the series ends
    assert lower[0] < len(frames) - 4


def test_only_the_neighbour_window_is_kept(blob_runner, specs, frames):
    detector = StreamingSeriesDetector(blob_runner, specs, batch_size=1)
    sizes = []
    for f in frames:
        detector.push_frame(f)
        sizes.append(len(detector._planes))
    assert max(sizes) <= 2 * detector.half + 1
    assert detector.n_inferred == len(frames) - detector.half
    detector.close()
    assert detector.n_inferred == len(frames)


def test_out_of_order_and_foreign_slices_are_refused(blob_runner, specs, frames):
    detector = StreamingSeriesDetector(blob_runner, specs)
    detector.push_frame(frames[0])
    detector.push_frame(frames[1])
    with pytest.raises(SliceOrderError) as e:
        detector.check_sequence([frames[0].geometry])
    assert e.value.kind == "order"
    with pytest.raises(SliceOrderError) as e:
        detector.push_frame(frames[1])
    assert e.value.kind == "order"
    tilted = dataclasses.replace(frames[2].geometry, row_direction=(0.0, 1.0, 0.0), column_direction=(0.0, 0.0, 1.0))
    with pytest.raises(SliceOrderError) as e:
        detector.check_sequence([tilted])
    assert e.value.kind == "geometry"
    small = dataclasses.replace(frames[2].geometry, rows=32)
    with pytest.raises(SliceOrderError) as e:
        detector.check_sequence([small])
    assert e.value.kind == "geometry"
    # a refused slice leaves the detector as it was
    detector.push_frame(frames[2])
    assert detector.n_pushed == 3


def test_push_after_close_is_an_error(blob_runner, specs, frames):
    detector = StreamingSeriesDetector(blob_runner, specs)
    detector.push_frame(frames[0])
    detector.close()
    assert detector.close() == []
    with pytest.raises(RuntimeError):
        detector.push_frame(frames[1])


def test_planes_must_match_the_model_input(blob_runner, specs, frames):
    detector = StreamingSeriesDetector(blob_runner, specs)
    with pytest.raises(ValueError, match="shape"):
        detector.push(np.zeros((1, 8, 8), np.float32), frames[0].geometry)


def test_timings_are_recorded_per_slice(blob_runner, specs, frames):
    recorded = []
    detector = StreamingSeriesDetector(blob_runner, specs, record=lambda stage, s: recorded.append((stage, s)))
    for f in frames[:6]:
        detector.push(detector.prepare(f), f.geometry, received_at=0.0)
    detector.close()
    stages = [s for s, _ in recorded]
    assert stages.count("infer") == stages.count("postprocess") == stages.count("slice_latency") == 6
    assert all(v >= 0 for _, v in recorded)
