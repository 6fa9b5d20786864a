import argparse
import fcntl
import json
import os
import re
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from edge.errors import InputError  # noqa: E402
from edge.update import commands  # noqa: E402
from edge.update.device import DeviceProfile, check_compatibility  # noqa: E402
from edge.update.errors import (  # noqa: E402
    BundleError,
    ExpiredError,
    GoldenCheckError,
    HealthCheckError,
    IncompatibleBundleError,
    RollbackRefusedError,
    SignatureError,
    UpdateBusyError,
    UpdateError,
)
from edge.update.installer import ROTATION_PAYLOAD  # noqa: E402
from edge.update.manifest import TensorRTRange  # noqa: E402
from edge.update.prepare import open_prepared, prepare_model  # noqa: E402
from edge.update.signing import PrivateKey, TrustStore, make_rotation  # noqa: E402
from edge.update.state import PendingSwitch, UpdateState  # noqa: E402
from update_helpers import NOW, build_bundle, installer, make_state  # noqa: E402


@pytest.fixture
def setup(tmp_path, models, signing_key):
    """A state folder trusting ``signing_key`` and a bundle factory."""
    root = make_state(tmp_path / "state", signing_key)

    def bundle(release, **kwargs):
        out = tmp_path / f"b{release}-{len(os.listdir(tmp_path))}.tar.gz"
        return build_bundle(out, models, kwargs.pop("key", signing_key), release, **kwargs)

    return root, bundle


def entries(root: Path):
    return sorted(os.listdir(root / "versions"))


def assert_active(inst, name, previous=None):
    st = inst.status()
    assert st.current.name == name and st.current.verified, st.current
    assert (st.previous.name if st.previous else None) == previous
    assert st.pending is None
    assert entries(inst.root) == sorted(n for n in (name, previous) if n)
    assert not [p for p in os.listdir(inst.root) if p.startswith(".")]
    return st


def test_apply_installs_and_keeps_the_previous_version(setup):
    root, bundle = setup
    inst = installer(root)
    r1 = inst.apply(bundle(1))
    assert (r1.version, r1.backend, r1.replaced) == ("1-1.1.0", "onnxruntime", None)
    matched = re.search(r"(\d+)/(\d+) required finding", r1.golden)
    assert matched and matched.group(1) == matched.group(2) != "0", r1.golden
    assert os.readlink(root / "current") == "versions/1-1.1.0"
    r2 = inst.apply(bundle(2))
    assert r2.replaced == "1-1.1.0"
    st = assert_active(inst, "2-1.2.0", "1-1.1.0")
    assert st.release_floor == 2 and [h["result"] for h in st.history] == ["ok", "ok"]
    prepared = open_prepared(root / "current")
    assert prepared.backend == "onnxruntime" and prepared.artifact_path.read_bytes()[:2] != b""


def test_older_and_equal_releases_are_refused(setup):
    root, bundle = setup
    inst = installer(root)
    old = bundle(1)
    inst.apply(bundle(2))
    with pytest.raises(RollbackRefusedError, match="release 1 .* is older than release 2 already installed"):
        inst.apply(old)
    same = bundle(2)
    with pytest.raises(RollbackRefusedError, match="already installed; pass --force"):
        inst.apply(same)
    assert_active(inst, "2-1.2.0")
    r = inst.apply(same, force=True)
    assert r.version == "2-1.2.0.2" and r.replaced == "2-1.2.0"
    assert_active(inst, "2-1.2.0.2", "2-1.2.0")


def test_bad_bundles_change_nothing(setup, signing_key, models, tmp_path):
    root, bundle = setup
    inst = installer(root)
    inst.apply(bundle(1))
    plain = bundle(2, compress=False)
    data = bytearray(plain.read_bytes())
    with tarfile.open(plain) as tar:
        model = tar.getmember("payload/model.onnx")
    data[model.offset_data + 100] ^= 0xFF
    plain.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx' does not match its sha256"):
        inst.apply(plain)
    with pytest.raises(SignatureError, match="does not trust"):
        inst.apply(bundle(3, key=PrivateKey.generate()))
    with pytest.raises(ExpiredError):
        installer(root, now=lambda: NOW + timedelta(days=365)).apply(bundle(4))
    cut = bundle(5)
    cut.write_bytes(cut.read_bytes()[:-300])
    with pytest.raises(BundleError, match="cannot read the archive"):
        inst.apply(cut)
    assert_active(inst, "1-1.1.0")
    assert UpdateState.load(root).release_floor == 1


def test_compatibility_rules(setup, models, signing_key):
    root, bundle = setup
    from edge.update.bundle import verify_bundle

    trust = TrustStore.load(root / "trusted_keys.json")
    cpu_only = verify_bundle(bundle(1), trust, now=NOW).manifest
    orin = verify_bundle(bundle(2, hardware=("cpu", "jetson-orin"), tensorrt=TensorRTRange("8.6", "10.4")),
                         trust, now=NOW).manifest
    trt_device = DeviceProfile("0.1.0", ("jetson-orin",), "10.3.0.26")
    assert check_compatibility(cpu_only, DeviceProfile("0.1.0", ("cpu",))) == "onnxruntime"
    assert check_compatibility(orin, DeviceProfile("0.1.0", ("cpu",))) == "onnxruntime"
    assert check_compatibility(orin, trt_device) == "tensorrt"
    with pytest.raises(IncompatibleBundleError, match="needs runtime >= 0.1.0; this device runs 0.0.9"):
        check_compatibility(cpu_only, DeviceProfile("0.0.9", ("cpu",)))
    with pytest.raises(IncompatibleBundleError, match="targets cpu; this TensorRT device is jetson-orin"):
        check_compatibility(cpu_only, trt_device)
    with pytest.raises(IncompatibleBundleError, match=r"needs TensorRT >=8.6,<10.4; this device has 10.4.0"):
        check_compatibility(orin, DeviceProfile("0.1.0", ("jetson-orin",), "10.4.0"))
    with pytest.raises(IncompatibleBundleError, match="targets cpu, jetson-orin; this TensorRT device is jetson-xavier"):
        check_compatibility(orin, DeviceProfile("0.1.0", ("jetson-xavier",), "8.6.2"))
    orin_only = verify_bundle(bundle(3, hardware=("jetson-orin",), tensorrt=TensorRTRange("8.6")), trust, now=NOW).manifest
    with pytest.raises(IncompatibleBundleError, match="needs 'cpu' in the targets"):
        check_compatibility(orin_only, DeviceProfile("0.1.0", ("cpu",)))

    # the installer asks the hook for a TensorRT build on a TensorRT device
    asked = []

    def prepare(staged, manifest, backend):
        asked.append(backend)
        return prepare_model(staged, manifest, "onnxruntime")  # no TensorRT here: ONNX Runtime stands in

    inst = installer(root, device=trt_device, prepare=prepare)
    with pytest.raises(IncompatibleBundleError):
        inst.apply(bundle(4))
    assert entries(root) == [] and asked == []
    inst.apply(bundle(5, hardware=("cpu", "jetson-orin"), tensorrt=TensorRTRange("10.0", "11")))
    assert asked == ["tensorrt"]


def test_failed_golden_check_leaves_the_old_version_active(setup):
    root, bundle = setup
    inst = installer(root)
    inst.apply(bundle(1))
    with pytest.raises(GoldenCheckError, match="2-1.2.0 before the switch: golden check on 2 input.*heatmap max abs diff"):
        inst.apply(bundle(2, model="b", golden="a"))  # model b shipped with model a's golden vectors
    assert_active(inst, "1-1.1.0")
    assert UpdateState.load(root).release_floor == 1
    inst.apply(bundle(2))  # the fixed release installs


def test_failed_health_check_after_the_switch_reverts(setup):
    root, bundle = setup
    inst = installer(root)
    inst.apply(bundle(1))
    inst.apply(bundle(2))

    def open_failing_for_release_3(folder):
        if os.path.basename(os.path.realpath(folder)).startswith("3-"):
            raise InputError(folder, "engine file unreadable")
        return open_prepared(folder)

    with pytest.raises(HealthCheckError, match="3-1.3.0 failed its health check after the switch: .*engine file "
                                               "unreadable; reverted to 2-1.2.0"):
        installer(root, open_version=open_failing_for_release_3).apply(bundle(3))
    st = assert_active(inst, "2-1.2.0", "1-1.1.0")
    assert st.release_floor == 2 and st.history[-1]["result"] == "reverted"
    assert inst.apply(bundle(3)).version == "3-1.3.0"  # not counted as installed: no --force needed


def test_rollback_and_roll_forward(setup):
    root, bundle = setup
    inst = installer(root)
    with pytest.raises(UpdateError, match="no previous version"):
        inst.rollback()
    b1 = bundle(1)
    inst.apply(b1)
    inst.apply(bundle(2))
    r = inst.rollback()
    assert (r.version, r.replaced) == ("1-1.1.0", "2-1.2.0")
    st = assert_active(inst, "1-1.1.0", "2-1.2.0")
    assert st.release_floor == 2
    with pytest.raises(RollbackRefusedError, match="older than release 2"):
        inst.apply(b1)
    inst.rollback()
    assert_active(inst, "2-1.2.0", "1-1.1.0")


def test_altered_installed_files_are_reported_and_not_rolled_back_to(setup):
    root, bundle = setup
    inst = installer(root)
    inst.apply(bundle(1))
    inst.apply(bundle(2))
    model = root / "versions" / "1-1.1.0" / "payload" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    st = inst.status()
    assert st.current.verified and st.previous.verified is False
    assert "model.onnx: missing or altered" in st.previous.problem
    assert inst.status(verify=False).previous.verified is None
    with pytest.raises(UpdateError, match="previous version 1-1.1.0 cannot be used"):
        inst.rollback()
    assert inst.status().current.name == "2-1.2.0"


def test_one_operation_at_a_time(setup):
    root, bundle = setup
    inst = installer(root)
    b = bundle(1)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UpdateBusyError, match="another update operation is running"):
            inst.apply(b)
    inst.apply(b)


def test_recovery_undoes_an_uncommitted_switch(setup):
    root, bundle = setup
    inst = installer(root)
    inst.apply(bundle(1))
    inst.apply(bundle(2))
    # as left by an agent killed right after switching to release 2 (release 1 was then current)
    state = UpdateState.load(root)
    state.release_floor = 1
    state.pending = PendingSwitch("apply", "2-1.2.0", "1-1.1.0", None)
    state.save(root)
    (root / "versions" / ".staging-3-999").mkdir()
    os.symlink("versions/x", root / ".current.link-999")
    notes = inst.recover()
    assert notes and "apply of 2-1.2.0 was interrupted" in notes[0]
    st = assert_active(inst, "1-1.1.0")
    assert st.release_floor == 1 and st.history[-1]["result"] == "reverted"


def test_key_rotation_delivered_in_a_bundle(setup, signing_key, tmp_path):
    root, bundle = setup
    inst = installer(root)
    new = PrivateKey.generate()
    rotation = tmp_path / "rotation.json"
    rotation.write_bytes(make_rotation(signing_key, 1, add=[new.public_key], revoke=[signing_key.key_id]))
    r = inst.apply(bundle(1, rotation=rotation))
    assert any("trust store updated" in n for n in r.notes)
    assert list(TrustStore.load(root / "trusted_keys.json").keys) == [new.key_id]
    assert ROTATION_PAYLOAD in (root / "versions" / "1-1.1.0" / "manifest.json").read_text()
    with pytest.raises(SignatureError, match="does not trust"):
        inst.apply(bundle(2))
    inst.apply(bundle(2, key=new))
    with pytest.raises(UpdateError, match="cannot be used"):
        inst.rollback()  # release 1 was signed by the revoked key


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="edge")
    commands.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_damaged_state_is_reported_not_guessed(setup):
    root, bundle = setup
    inst = installer(root)
    inst.apply(bundle(1))
    (root / "state.json").write_text('{"format": 1, "release_floor": "7"}')
    with pytest.raises(UpdateError, match="state.json: the update state is damaged"):
        inst.apply(bundle(2))
    assert inst.link_target("current") == "1-1.1.0"


def test_commands(setup, capsys):
    root, bundle = setup
    state = ["--state-dir", str(root)]
    rc, out = run_cli(["update", "status", *state], capsys)
    assert rc == 1 and json.loads(out)["current"] is None
    b1, b2 = bundle(1), bundle(2)
    rc, out = run_cli(["update", "apply", str(b1), *state], capsys)
    assert rc == 0 and "tiny-detector 1-1.1.0 is active (onnxruntime); previous: none" in out
    run_cli(["update", "apply", str(b2), *state, "--hardware", "cpu"], capsys)
    rc, out = run_cli(["update", "status", *state], capsys)
    status = json.loads(out)
    assert rc == 0 and status["current"]["name"] == "2-1.2.0" and status["previous"]["verified"] is True
    assert status["device"]["backend"] in ("onnxruntime", "tensorrt")
    rc, out = run_cli(["update", "rollback", *state], capsys)
    assert rc == 0 and out.startswith("rollback: tiny-detector 1-1.1.0 is active")
    with pytest.raises(RollbackRefusedError):
        run_cli(["update", "apply", str(b2), *state], capsys)
