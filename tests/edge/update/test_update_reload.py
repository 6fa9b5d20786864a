import os

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edge.errors import EdgeError, InputError  # noqa: E402
from edge.update.golden import GoldenVectors, run_model  # noqa: E402
from edge.update.prepare import open_prepared  # noqa: E402
from edge.update.reload import ModelHandle  # noqa: E402
from update_helpers import build_bundle, golden_inputs, installer, make_state  # noqa: E402


def which_model(outputs, models):
    """'a' or 'b': the tiny model whose golden outputs these are."""
    for name, (_, golden) in models.items():
        if np.allclose(outputs["heatmap"], GoldenVectors.load(golden).outputs["heatmap"], atol=1e-6):
            return name
    return None


def test_new_model_is_picked_up_between_series_and_a_bad_one_is_not(tmp_path, models, signing_key):
    root = make_state(tmp_path / "state", signing_key)
    inst = installer(root)
    with pytest.raises(EdgeError, match="no model installed"):
        ModelHandle(root).refresh()
    inst.apply(build_bundle(tmp_path / "b1.tar.gz", models, signing_key, 1, model="a"))

    opened = []

    def open_version(folder):
        opened.append(os.path.basename(folder))
        if os.path.basename(folder).startswith("3-"):
            raise InputError(folder, "engine deserialisation failed")
        return open_prepared(folder)

    handle = ModelHandle(root, open_version=open_version)
    x = golden_inputs(2)
    served = []
    old_runner = None
    for series in range(8):
        switched = handle.refresh()  # the runtime calls this before each series, never inside one
        if series == 3:
            assert switched and not old_runner.is_active  # the old runner was released after the swap
        outputs = run_model(handle.runner, x)
        served.append((handle.version, which_model(outputs, models), switched))
        old_runner = handle.runner
        if series == 2:
            inst.apply(build_bundle(tmp_path / "b2.tar.gz", models, signing_key, 2, model="b"))
        if series == 5:
            inst.apply(build_bundle(tmp_path / "b3.tar.gz", models, signing_key, 3, model="a"))

    assert [s[:2] for s in served] == [("1-1.1.0", "a")] * 3 + [("2-1.2.0", "b")] * 5
    assert [s[2] for s in served] == [True, False, False, True, False, False, False, False]
    assert handle.last_error and "engine deserialisation failed" in handle.last_error
    assert opened == ["1-1.1.0", "2-1.2.0", "3-1.3.0"]  # the bad version is tried once, not every series
    handle.close()


def test_handle_gives_a_detector_for_the_model_in_service(tmp_path, models, signing_key):
    from edge.phantom.series import generate_series

    root = make_state(tmp_path / "state", signing_key)
    installer(root).apply(build_bundle(tmp_path / "b1.tar.gz", models, signing_key, 1))
    frames = generate_series(1, size=64, n_slices=4, n_nodules=1).frames()
    with ModelHandle(root) as handle:
        detector = handle.detector()
        assert handle.detector() is detector
        findings = detector.detect(frames)
        assert isinstance(findings, list)
        assert detector.specs == handle.specs == open_prepared(root / "current").specs
    assert handle.runner is None
