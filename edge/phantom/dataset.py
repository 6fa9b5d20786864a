"""Phantom sets on disk, and the train / val / test split by scanner profile.

Which profiles go where (the test split only has scanners never seen in
training or validation, so it measures generalisation to new scanners):

=====================  ==============================================
split                  profiles
=====================  ==============================================
train, val             siemens_b30f, ge_standard, ge_lung, philips_c,
                       toshiba_fc13
test                   siemens_br64_sharp, canon_fc52_lowdose,
                       philips_yb_thick
=====================  ==============================================

The held-out profiles differ in kernel sharpness, noise level and grain,
slice thickness, storage (padding values, signedness, intercept) and slice
order, and come from the same generator: a second, independent generator is
the other half of the final evaluation and is not part of this package.
"""

import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from edge.errors import ConfigError
from edge.phantom.annotations import PhantomSetWriter
from edge.phantom.dicom_writer import write_series
from edge.phantom.scanner import PROFILES, get_profile
from edge.phantom.series import PhantomSeries, generate_series

TRAIN_PROFILES = ("siemens_b30f", "ge_standard", "ge_lung", "philips_c", "toshiba_fc13")
TEST_PROFILES = ("siemens_br64_sharp", "canon_fc52_lowdose", "philips_yb_thick")
SPLIT_PROFILES: Dict[str, Sequence[str]] = {"train": TRAIN_PROFILES, "val": TRAIN_PROFILES, "test": TEST_PROFILES}


def series_seed(seed: int, namespace: str, index: int) -> int:
    """The patient seed of series ``index`` of a set (distinct per namespace, e.g. split)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(namespace.encode()), int(index)])
    return int(ss.generate_state(1, np.uint32)[0])


def make_phantom_set(
    out_dir,
    n_series: int,
    seed: int,
    profiles: Sequence[str] = tuple(PROFILES),
    namespace: str = "set",
    size: int = 512,
    n_slices: Optional[int] = None,
    localizer: bool = True,
    progress: Optional[Callable[[int, PhantomSeries, str], None]] = None,
) -> List[PhantomSeries]:
    """Generate and write ``n_series`` series into ``out_dir`` with the three ground-truth tables.

    Series ``i`` goes to ``out_dir/series_<i>/`` with patient seed
    ``series_seed(seed, namespace, i)`` and a profile drawn from ``profiles``.
    ``progress(i, series, folder)`` is called after each series is written.
    Returns the series without their pixel data (to keep memory flat).
    """
    if not isinstance(n_series, int) or n_series < 0:
        raise ConfigError(f"number of series must be an integer >= 0, got {n_series!r}")
    if not profiles:
        raise ConfigError("at least one scanner profile is required")
    for name in profiles:
        get_profile(name)
    out_dir = Path(out_dir)
    pick = np.random.default_rng([int(seed), zlib.crc32(namespace.encode()), 7])
    done = []
    with PhantomSetWriter(out_dir) as tables:
        for i in range(n_series):
            name = profiles[int(pick.integers(len(profiles)))]
            series = generate_series(series_seed(seed, namespace, i), name, size=size, n_slices=n_slices,
                                     localizer=localizer)
            folder = f"series_{i:04d}"
            write_series(series, out_dir / folder)
            tables.add(series, folder)
            if progress is not None:
                progress(i, series, folder)
            series.pixels = series.pixels[:0]
            done.append(series)
    return done


def make_dataset(
    out_dir,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    size: int = 512,
    n_slices: Optional[int] = None,
    localizer: bool = True,
    progress: Optional[Callable[[str, int, PhantomSeries, str], None]] = None,
) -> Dict[str, List[PhantomSeries]]:
    """``out_dir/train``, ``val`` and ``test`` phantom sets; test uses only held-out profiles."""
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        cb = None if progress is None else (lambda i, s, f, split=split: progress(split, i, s, f))
        out[split] = make_phantom_set(Path(out_dir) / split, n, seed, SPLIT_PROFILES[split], namespace=split,
                                      size=size, n_slices=n_slices, localizer=localizer, progress=cb)
    return out
