"""kill -9 at random points of ``apply``: afterwards exactly one complete, verified version is active.

A helper interpreter imports the runtime once and forks one child per trial;
the child runs ``Installer.apply`` (real bundle verification, extraction,
ONNX Runtime preparation and golden checks) and the helper SIGKILLs it after a
delay spread over the measured duration of an apply (the helper reaps the
child itself, so no stale pid is ever signalled). Where the kill lands in time
depends on the machine's load, so the moments that matter most -- just after
each link of the switch -- are also hit exactly: the child kills itself there.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edge.update.errors import RollbackRefusedError  # noqa: E402
from update_helpers import NOW, build_bundle, installer, make_state, subprocess_env  # noqa: E402

TRIALS = 24

HELPER = textwrap.dedent("""
    import os, signal, sys, time
    from datetime import datetime
    from edge.update.device import DeviceProfile
    from edge.update.installer import Installer
    import onnxruntime  # noqa: F401  (imported before forking, so each child starts fast)
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: F401

    now = datetime.fromisoformat(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        state, bundle, delay = line.rstrip("\\n").split("\\t")
        crash_after_link = delay[len("after:"):] if delay.startswith("after:") else None
        delay = float("inf") if crash_after_link else float(delay)
        sys.stdout.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            if crash_after_link:  # die right after the installer moves this link
                set_link = Installer._set_link

                def crashing_set_link(self, link, version):
                    set_link(self, link, version)
                    if link == crash_after_link:
                        os.kill(os.getpid(), signal.SIGKILL)

                Installer._set_link = crashing_set_link
            try:
                Installer(state, device=DeviceProfile("0.1.0", ("cpu",)), now=lambda: now).apply(bundle)
                code = 0
            except BaseException as e:
                sys.stderr.write(f"apply failed: {type(e).__name__}: {e}\\n")
                code = 3
            os._exit(code)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.perf_counter() - start
            if done:
                print(f"exited {os.waitstatus_to_exitcode(status)} {elapsed:.4f}", flush=True)
                break
            if elapsed >= delay:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                print(f"killed {elapsed:.4f}", flush=True)
                break
            time.sleep(0.0005)
""")


@pytest.fixture
def helper(tmp_path):
    env = subprocess_env()
    env["OPENBLAS_NUM_THREADS"] = "1"
    with open(tmp_path / "helper.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", HELPER, NOW.isoformat()], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready", (tmp_path / "helper.err").read_text()

        def run(state, bundle, delay):
            proc.stdin.write(f"{state}\t{bundle}\t{delay}\n")
            proc.stdin.flush()
            line = proc.stdout.readline().split()
            assert line, (tmp_path / "helper.err").read_text()
            return line

        yield run
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_kill_9_during_apply_leaves_one_complete_verified_version(tmp_path, models, signing_key, helper):
    template = make_state(tmp_path / "template", signing_key)
    installer(template).apply(build_bundle(tmp_path / "b1.tar.gz", models, signing_key, 1))
    b2 = build_bundle(tmp_path / "b2.tar.gz", models, signing_key, 2)

    # undisturbed applies, to spread the kills over the (noisy) duration of one
    durations = []
    for k in range(3):
        shutil.copytree(template, tmp_path / f"calibrate{k}", symlinks=True)
        outcome = helper(tmp_path / f"calibrate{k}", b2, 60)
        assert outcome[:2] == ["exited", "0"], (tmp_path / "helper.err").read_text()
        durations.append(float(outcome[2]))
    duration = max(durations)

    rng = np.random.default_rng(7)
    # random moments over an apply, then exactly after each link of the switch moves
    delays = [((trial + rng.random()) / TRIALS % 1.0) * duration * 1.2 for trial in range(TRIALS)]
    results = []
    for trial, delay in enumerate(delays + ["after:previous", "after:current"]):
        state = tmp_path / f"trial{trial}"
        shutil.copytree(template, state, symlinks=True)
        outcome = helper(state, b2, delay)
        if isinstance(delay, str):
            assert outcome[:2] == ["exited", "-9"], (delay, outcome, (tmp_path / "helper.err").read_text())
            outcome[0] = "killed"
        assert outcome[0] == "killed" or outcome[1] == "0", (tmp_path / "helper.err").read_text()

        inst = installer(state)
        # before any recovery: `current` is a complete version that verifies
        active = inst.link_target("current")
        assert active in ("1-1.1.0", "2-1.2.0")
        assert inst.verify_version(active).release == int(active[0])

        inst.recover()
        st = inst.status()
        assert st.pending is None and st.current.verified, st.current
        assert st.release_floor == st.current.release
        expected = {"1-1.1.0": [], "2-1.2.0": ["1-1.1.0"]}[st.current.name]
        assert ([st.previous.name] if st.previous else []) == expected
        assert sorted(os.listdir(state / "versions")) == sorted([st.current.name] + expected)
        assert not [p for p in os.listdir(state) if p.startswith(".")]
        results.append((outcome[0], active, st.current.name))
        if delay == "after:previous":
            assert results[-1] == ("killed", "1-1.1.0", "1-1.1.0")  # switch not finished: rolled back
        if delay == "after:current":
            # switched but not committed when killed: recovery reverts to the old version
            assert results[-1] == ("killed", "2-1.2.0", "1-1.1.0")

        if trial % 3 == 0:  # the device takes the update afterwards (or already has it)
            if st.current.name == "1-1.1.0":
                assert inst.apply(b2).version == "2-1.2.0"
            else:
                with pytest.raises(RollbackRefusedError):
                    inst.apply(b2)

    killed = [r for r in results[:TRIALS] if r[0] == "killed"]
    assert len(killed) >= TRIALS // 4, (durations, results)  # most timed kills land mid-apply, whatever the load
