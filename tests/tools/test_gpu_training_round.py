"""tools/gpu_training_round.sh as a dry run on the CPU: tiny sizes, every stage through to the release files."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, **overrides):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), BUDGET="400", GEN_PROCS="2",
               PER_PROC="1", VAL_SERIES="1", STEPS="2", CACHE_WORKERS="1", CACHE_S="20", DEVICE="cpu",
               PY=sys.executable)
    env.update(overrides)
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_training_round.sh")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def released(tmp_path):
    return sorted(p.stem for p in (tmp_path / "out").glob("*.pt"))


def test_dry_run_on_the_cpu_writes_three_release_checkpoints_and_the_logs(tmp_path):
    r = dry_run(tmp_path)
    assert "dataset: 2 training series" in r.stdout
    assert released(tmp_path) == ["student_a", "student_b", "teacher"]
    for name in ("teacher", "student_a", "student_b"):
        ckpt = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True)
        assert ckpt["step"] == 2 and "optimizer" not in ckpt, name
        assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    with tarfile.open(tmp_path / "out" / "logs.tgz") as t:
        names = set(t.getnames())
    assert {"./teacher/train_log.csv", "./student_a.log", "./gen_g1.log"} <= names


def test_students_only_one_per_learning_rate_each_from_its_own_checkpoint(tmp_path):
    inits = ["models/student/student.pt", "models/teacher/teacher.pt", "models/student/student.pt"]
    dry_run(tmp_path, GEN_PROCS="1", TEACHER_LR="none", STUDENT_LRS="1e-3 2e-3 7e-4", STUDENT_INITS=" ".join(inits))
    assert released(tmp_path) == ["student_a", "student_b", "student_c"]
    ckpts = [torch.load(tmp_path / "out" / f"student_{m}.pt", weights_only=True) for m in "abc"]
    assert [c["train_config"]["lr"] for c in ckpts] == [1e-3, 2e-3, 7e-4]
    for ckpt, init in zip(ckpts, inits):
        assert ckpt["arch"]["widths"] == torch.load(ROOT / init, weights_only=True)["arch"]["widths"], init
    assert ckpts[0]["arch"]["widths"] != ckpts[1]["arch"]["widths"]


def test_student_inits_must_match_the_learning_rates_before_any_work(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), DEVICE="cpu", PY=sys.executable)
    for inits, message in (("models/student/student.pt", "names 1 checkpoints for 2 learning rates"),
                           ("models/student/student.pt absent.pt", "student checkpoint not found: absent.pt")):
        r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_training_round.sh")], capture_output=True, text=True,
                           env=dict(env, STUDENT_LRS="1e-3 2e-3", STUDENT_INITS=inits), timeout=60)
        assert r.returncode == 1 and message in r.stdout, r.stdout + r.stderr
        assert not (tmp_path / "work" / "gen").exists()
