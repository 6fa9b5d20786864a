"""The default calibration pool: phantom series from :mod:`edge.phantom`, made once and reused.

Only the scanner profiles of the training split are used (the held-out test
profiles must not leak into anything the model is tuned on), each with the
same number of series, under a seed namespace of its own ("calibration-<profile>")
so no series coincides with a training, validation or test series. The pool
is ``<profile>/series_<i>/`` with each profile's ``series.csv`` and
``annotations.csv``, which :func:`calib.selection.scan_pool` reads.
"""

import json
from pathlib import Path
from typing import Callable, Sequence

from edge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POOL_DIR = REPO / "build" / "calib_pool"  # build/ is git-ignored: the pool is ~40 MB per series
POOL_FILE = "pool.json"
DEFAULT_SERIES_PER_PROFILE = 2
DEFAULT_SIZE = 256


def ensure_phantom_pool(pool_dir=DEFAULT_POOL_DIR, series_per_profile: int = DEFAULT_SERIES_PER_PROFILE,
                        seed: int = 0, size: int = DEFAULT_SIZE, profiles: Sequence[str] = (),
                        n_slices=None, log: Callable[[str], None] = print) -> Path:
    """``pool_dir`` holding the phantom pool of these settings, generated on first use.

    A folder holding a pool made with other settings, or anything else, is an
    error rather than being overwritten. ``pool.json`` is written last, so an
    interrupted generation is never mistaken for a finished one.
    """
    from edge.phantom import TRAIN_PROFILES, make_phantom_set

    profiles = tuple(profiles) or TRAIN_PROFILES
    params = {"generator": "edge.phantom.make_phantom_set", "profiles": list(profiles), "seed": seed,
              "series_per_profile": series_per_profile, "size": size, "n_slices": n_slices}
    pool_dir = Path(pool_dir)
    marker = pool_dir / POOL_FILE
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text())
        except ValueError:
            existing = None
        if existing == params:
            return pool_dir
        raise ConfigError(f"{pool_dir}: holds a phantom pool made with other settings ({marker}); "
                          "delete the folder or pass --calib-pool")
    if pool_dir.exists() and any(pool_dir.iterdir()):
        raise ConfigError(f"{pool_dir}: exists but is not a finished phantom pool (no {POOL_FILE}); "
                          "delete it to regenerate, or pass --calib-pool")
    log(f"generating the calibration pool: {series_per_profile} phantom series x {len(profiles)} training "
        f"profiles, {size} px, in {pool_dir} (once)")
    for profile in profiles:
        make_phantom_set(pool_dir / profile, series_per_profile, seed, (profile,), namespace=f"calibration-{profile}",
                         size=size, n_slices=n_slices, localizer=False)
    marker.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    return pool_dir
