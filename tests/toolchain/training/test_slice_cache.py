import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "edge" / "ingest"))

from ingest_helpers import SLICE_MM, Sphere, write_series  # noqa: E402

from edge.preprocess.spec import PreprocessSpec  # noqa: E402
from toolchain.training.slice_cache import cache_split  # noqa: E402


def test_each_slice_lists_the_nodules_it_crosses_with_their_annotation_index(tmp_path):
    spheres = (Sphere(20.0, 0.0, -4.0, radius=6.0), Sphere(-30.0, 10.0, 5.0, radius=2.0))
    s = write_series(tmp_path / "train" / "s", n_slices=10, spheres=spheres, seed=1)
    with open(tmp_path / "train" / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for sp in spheres:
            w.writerow([s.series_uid, sp.x, sp.y, sp.z, 2 * sp.radius])
    (cached,) = cache_split(tmp_path / "train", PreprocessSpec(out_height=64, out_width=64, slices=3))
    z = cached.locations
    for k in range(len(z)):
        expect = [i for i, sp in enumerate(spheres) if abs(z[k] - sp.z) <= sp.radius]
        assert cached.nodule_ids[k] == expect, k
        for (_, _, _, frac), i in zip(cached.nodules[k], cached.nodule_ids[k]):
            assert abs(frac - abs(z[k] - spheres[i].z) / spheres[i].radius) < 1e-6
    assert SLICE_MM == 2.0 and [z[k] for k, ids in enumerate(cached.nodule_ids) if 1 in ids] == [3.0, 5.0, 7.0]


def test_decoding_in_worker_processes_gives_the_same_cache(tmp_path):
    for i in range(3):
        write_series(tmp_path / "train" / f"s{i}", n_slices=5, spheres=(Sphere(10.0 * i, 0.0, 0.0, radius=4.0),),
                     seed=i)
    (tmp_path / "train" / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    spec = PreprocessSpec(out_height=32, out_width=32, slices=3)
    serial = cache_split(tmp_path / "train", spec)
    parallel = cache_split(tmp_path / "train", spec, workers=2)
    assert len(serial) == 3 and [s.series_uid for s in serial] == [s.series_uid for s in parallel]
    for a, b in zip(serial, parallel):
        assert (a.planes == b.planes).all() and (a.locations == b.locations).all()
