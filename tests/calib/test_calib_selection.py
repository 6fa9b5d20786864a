import json
import shutil

import pytest

from calib.phantom_pool import POOL_FILE, ensure_phantom_pool
from calib.selection import (
    SelectionSettings,
    allocate,
    manifest_text,
    read_manifest,
    scan_pool,
    select_slices,
    write_manifest,
)
from edge.errors import ConfigError, InputError

PROFILES = ("ge_lung", "philips_c", "siemens_b30f")


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool") / "pool"
    return ensure_phantom_pool(root, series_per_profile=1, seed=0, size=64, profiles=PROFILES, n_slices=14,
                               log=lambda _: None)


def test_allocate_water_fills_under_caps():
    assert allocate(10, [5, 5, 5]) == [4, 3, 3]
    assert allocate(10, [1, 5, 5]) == [1, 5, 4]
    assert allocate(100, [1, 2, 3]) == [1, 2, 3]
    assert allocate(8, [10, 10], [0.25, 0.75]) == [2, 6]
    assert allocate(8, [1, 10], [0.25, 0.75]) == [1, 7]
    assert allocate(5, [3, 10], [0.0, 1.0]) == [0, 5]
    assert allocate(5, [3, 2], [0.0, 1.0]) == [3, 2]  # zero weight still takes what nobody else can
    assert allocate(0, [3, 3]) == [0, 0]


def test_scan_reads_profiles_positions_and_nodules(pool_dir):
    pool = scan_pool(pool_dir)
    assert sorted(s.profile for s in pool.series) == sorted(PROFILES)
    assert pool.profile_source == "series.csv"
    assert pool.n_slices == 3 * 14
    for s in pool.series:
        locations = [p.location for p in s.slices]
        assert locations == sorted(locations)  # the runtime's slice order
        assert len({p.sop_uid for p in s.slices}) == 14
    assert any(s.nodules for s in pool.series)
    assert scan_pool(pool_dir).fingerprint() == pool.fingerprint()


def test_same_seed_same_manifest_other_seed_other_choice(pool_dir):
    pool = scan_pool(pool_dir)
    a = manifest_text(select_slices(pool, SelectionSettings(n=12, seed=3, position_bins=3)))
    b = manifest_text(select_slices(scan_pool(pool_dir), SelectionSettings(n=12, seed=3, position_bins=3)))
    c = manifest_text(select_slices(pool, SelectionSettings(n=12, seed=4, position_bins=3)))
    assert a == b
    assert a != c


def test_selection_is_stratified_and_explained(pool_dir):
    pool = scan_pool(pool_dir)
    m = select_slices(pool, SelectionSettings(n=12, seed=0, position_bins=3, nodule_fraction=0.5, context=2))
    assert m["selected"] == m["requested"] == 12
    slices = m["slices"]
    assert len({s["sop_uid"] for s in slices}) == 12
    per_profile = {p: sum(s["profile"] == p for s in slices) for p in PROFILES}
    assert per_profile == {p: 4 for p in PROFILES}
    for p in PROFILES:  # every position of every profile is represented
        assert {s["position"] for s in slices if s["profile"] == p} == {"apex", "middle", "base"}
    with_nodule = [s for s in slices if s["nodule"]]
    assert with_nodule and len(with_nodule) < len(slices)
    assert slices[0]["reason"].endswith("seeded random pick")
    assert all("farthest lung-window HU histogram" in s["reason"] for s in slices[1:])
    assert all(s["reason"].startswith(f"stratum {s['profile']} / {s['position']} /") for s in slices)
    quotas = sum(s["quota"] for s in m["strata"])
    assert quotas == 12 and all(s["quota"] <= s["available"] for s in m["strata"])


def test_stack_holds_clamped_neighbours_in_runtime_order(pool_dir):
    pool = scan_pool(pool_dir)
    m = select_slices(pool, SelectionSettings(n=42, seed=0, context=2))  # every slice of the pool
    assert m["selected"] == 42
    by_uid = {s.series_uid: s for s in pool.series}
    for entry in m["slices"]:
        series = by_uid[entry["series_uid"]]
        paths = [p.path for p in series.slices]
        k = paths.index(entry["path"])
        expected = [paths[min(max(k + d, 0), len(paths) - 1)] for d in range(-2, 3)]
        assert [p for p, _ in entry["stack"]] == expected
    for series in pool.series:  # the first slice of a series stands in for its missing neighbours below
        entry = next(e for e in m["slices"] if e["path"] == series.slices[0].path)
        assert entry["stack"][0] == entry["stack"][1] == entry["stack"][2] != entry["stack"][3]


def test_more_than_available_selects_everything_once(pool_dir):
    m = select_slices(scan_pool(pool_dir), SelectionSettings(n=500, seed=0))
    assert m["selected"] == 42 and m["requested"] == 500


def test_profiles_from_dicom_tags_without_series_csv(pool_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pool_dir / "ge_lung" / "series_0000", copy / "a")
    pool = scan_pool(copy)
    assert pool.profile_source == "dicom tags" and pool.annotations is None
    (profile,) = {s.profile for s in pool.series}
    assert profile.startswith("GE MEDICAL SYSTEMS/LUNG/") and profile.endswith("mm")


def test_manifest_file_round_trip_and_errors(pool_dir, tmp_path):
    m = select_slices(scan_pool(pool_dir), SelectionSettings(n=5, seed=0))
    path = write_manifest(tmp_path / "m.json", m)
    assert read_manifest(path) == json.loads(manifest_text(m))
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "none.json")
    (tmp_path / "other.json").write_text('{"format": "something"}')
    with pytest.raises(InputError, match="not a calibration manifest"):
        read_manifest(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="positive integer"):
        select_slices(scan_pool(pool_dir), SelectionSettings(n=0))
    with pytest.raises(InputError, match="annotations file not found"):
        scan_pool(pool_dir, annotations=tmp_path / "missing.csv")
    with pytest.raises(InputError, match="no CT series"):
        scan_pool(tmp_path)


def test_phantom_pool_is_reused_and_never_overwritten(pool_dir, tmp_path):
    again = ensure_phantom_pool(pool_dir, series_per_profile=1, seed=0, size=64, profiles=PROFILES, n_slices=14,
                                log=lambda _: pytest.fail("regenerated an existing pool"))
    assert again == pool_dir and (pool_dir / POOL_FILE).is_file()
    with pytest.raises(ConfigError, match="other settings"):
        ensure_phantom_pool(pool_dir, series_per_profile=2, seed=0, size=64, profiles=PROFILES, n_slices=14)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a finished phantom pool"):
        ensure_phantom_pool(tmp_path / "busy", size=64)
