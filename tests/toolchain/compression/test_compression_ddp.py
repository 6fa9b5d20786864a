import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from compression_helpers import make_sampler
from toolchain.compression.ddp import DistContext, RankSampler, init_distributed

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--out", str(tmp_path / "run"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_rank_samplers_draw_different_but_reproducible_crops():
    sampler = make_sampler(0)

    def crop(rank, step):
        return RankSampler(sampler, rank).sample(np.random.default_rng([0, step]))[0]

    assert np.array_equal(crop(0, 3), crop(0, 3))
    assert not np.array_equal(crop(0, 3), crop(1, 3))
    assert not np.array_equal(crop(1, 3), crop(1, 4))


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_distributed()
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed


def test_two_gloo_processes_train_identical_replicas_and_resume(tmp_path):
    # the first attempt dies in step 3 (2 crops per step per rank), after the step-2 checkpoint; then it resumes
    proc = torchrun(tmp_path, "--results", str(tmp_path / "ranks"), "--steps", "4", "--interrupt-after-crops", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed at step 2") == 1  # printed by rank 0 only
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["card"]["world_size"] == 2
    log = (run / "train_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"]
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "train_log.csv", "train_summary.json"]

    r0, r1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["interrupted_at"] == r1["interrupted_at"] == 2
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["equal"] and r1["equal"]
    assert r0["params"].keys() == r1["params"].keys()
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
        assert torch.equal(v, ckpt["state_dict"][k]), k  # rank 0 saved the replicas' weights
    assert not torch.equal(r0["first_crop"], r1["first_crop"])  # each rank sees its own data
