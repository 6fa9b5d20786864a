"""tools/gpu_training_round.sh as a dry run on the CPU: tiny sizes, every stage through to the release files."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_on_the_cpu_writes_three_release_checkpoints_and_the_logs(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), BUDGET="400", GEN_PROCS="2",
               PER_PROC="1", VAL_SERIES="1", STEPS="2", CACHE_WORKERS="1", CACHE_S="20", DEVICE="cpu",
               PY=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_training_round.sh")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dataset: 2 training series" in r.stdout
    for name in ("teacher", "student_a", "student_b"):
        ckpt = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True)
        assert ckpt["step"] == 2 and "optimizer" not in ckpt, name
        assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    with tarfile.open(tmp_path / "out" / "logs.tgz") as t:
        names = set(t.getnames())
    assert {"./teacher/train_log.csv", "./student_a.log", "./gen_g1.log"} <= names
