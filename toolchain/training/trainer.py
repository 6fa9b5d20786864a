"""Deterministic, resumable training loop for the detector (CPU friendly; a CUDA device optional).

Each step draws its batch from an RNG seeded by (seed, step), so a run resumed
from a checkpoint continues with exactly the batches it would have seen. On a
CUDA device the batches are the same but the arithmetic is not bitwise
reproducible (cuDNN picks its algorithms). With ``time_budget_s`` the step
count is fitted to the measured speed, so it depends on the machine.
"""

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from edge.errors import ConfigError
from toolchain.training.losses import detection_loss
from toolchain.training.sampling import CropSampler, collate


DEVICES = ("cpu", "cuda")
TIME_BUDGET_HELP = ("fit the schedule to this many seconds of the training loop, decoding the series not counted "
                    "(fewer steps on a slow machine; 0: off, the default)")


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 250
    val_every: int = 250
    val_batches: int = 8
    threads: int = 0  # 0: torch default
    device: str = "cpu"  # "cpu" or "cuda" (a CUDA device PyTorch can see)
    time_budget_s: float = 0.0  # > 0: fewer steps when the loop would run longer (the schedule is fitted to it)

    def check(self) -> None:
        """ConfigError for settings no run can use (checked before any data is read)."""
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError(f"steps must be >= 0 and batch size >= 1 (got {self.steps}, {self.batch_size})")
        if self.time_budget_s < 0:
            raise ConfigError(f"time budget must be >= 0 s (got {self.time_budget_s})")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be cpu or cuda (got {self.device!r})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda: PyTorch sees no CUDA device here (use --device cpu)")


def fitted_steps(done: int, elapsed_s: float, budget_s: float, step: int, planned: int) -> int:
    """Total steps that end the loop within ``budget_s``, at the speed of the ``done`` steps run so far.

    Never more than ``planned`` (the configured steps) and never below the next step.
    """
    if budget_s <= 0 or done <= 0 or elapsed_s <= 0:
        return planned
    more = int((budget_s - elapsed_s) * done / elapsed_s)
    return max(step + 1, min(planned, step + more))


def lr_at(step: int, cfg: TrainConfig, total: Optional[int] = None) -> float:
    """Linear warm-up, then cosine decay to 2% of ``cfg.lr`` at ``total`` steps (default ``cfg.steps``)."""
    total = cfg.steps if total is None else total
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def resumed_total_steps(state: dict, cfg: TrainConfig) -> int:
    """The checkpoint's (possibly time-fitted) total when it was run with this many configured steps, else ours."""
    same_plan = state.get("train_config", {}).get("steps") == cfg.steps
    return int(state["total_steps"]) if same_plan and "total_steps" in state else cfg.steps


def to_tensors(batch, device="cpu"):
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True) for a in batch]


def cpu_state(module: torch.nn.Module) -> dict:
    """``module``'s state dict on the CPU, so a checkpoint loads the same wherever it was trained."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class Trainer:
    """Trains ``model`` on crops from ``sampler``; ``loss_fn(model, x, targets) -> (loss, parts)``."""

    def __init__(self, model, sampler: CropSampler, val_sampler: Optional[CropSampler], cfg: TrainConfig, out_dir,
                 checkpoint_extra: dict, loss_fn: Optional[Callable] = None, progress: bool = True):
        cfg.check()
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device)
        self.sampler = sampler
        self.val_sampler = val_sampler
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.extra = checkpoint_extra
        self.loss_fn = loss_fn or (lambda m, x, t: detection_loss(m(x), t))
        self.progress = progress
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.total_steps = cfg.steps  # below cfg.steps when a time budget shortens the run
        self.best_val = float("inf")
        self._val_cache = None

    # checkpoints
    def _weights(self) -> dict:
        """The checkpoint's weight entries (CPU tensors)."""
        return {"state_dict": cpu_state(self.model)}

    def _load_weights(self, state: dict, path: Path) -> None:
        self.model.load_state_dict(state["state_dict"])

    def save(self, name: str):
        state = dict(self.extra, **self._weights())
        state.update(optimizer=self.opt.state_dict(), step=self.step, total_steps=self.total_steps,
                     best_val=self.best_val, train_config=asdict(self.cfg))
        tmp = self.out / (name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / name)

    def resume(self, path) -> None:
        path = Path(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._load_weights(state, path)
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.total_steps = resumed_total_steps(state, self.cfg)
        self.best_val = float(state.get("best_val", float("inf")))

    def _batch(self, sampler, rng):
        return to_tensors(collate([sampler.sample(rng) for _ in range(self.cfg.batch_size)]), self.device)

    def validate(self) -> float:
        if self.val_sampler is None:
            return float("nan")
        if self._val_cache is None:
            rng = np.random.default_rng([self.cfg.seed, 10**9])
            self._val_cache = [self._batch(self.val_sampler, rng) for _ in range(self.cfg.val_batches)]
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for b in self._val_cache:
                loss, _ = self.loss_fn(self.model, b[0], b[1:])
                total += float(loss)
        self.model.train()
        return total / len(self._val_cache)

    def fit(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        log_path = self.out / "train_log.csv"
        new_log = not log_path.exists() or self.step == 0
        log = open(log_path, "w" if new_log else "a", newline="")
        writer = csv.writer(log)
        if new_log:
            writer.writerow(["step", "lr", "loss", "heatmap", "size", "offset", "val_loss", "elapsed_s"])
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        t0 = time.time()
        start = self.step
        self.model.train()
        try:
            while self.step < self.total_steps:
                torch.manual_seed(cfg.seed * 1_000_003 + self.step)
                rng = np.random.default_rng([cfg.seed, self.step])
                x, *targets = self._batch(self.sampler, rng)
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(self.step, cfg, self.total_steps)
                loss, parts = self.loss_fn(self.model, x, targets)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
                self.opt.step()
                self.step += 1
                done = self.step - start
                if cfg.time_budget_s > 0 and (done == 50 or self.step % cfg.val_every == 0):
                    self._fit_to_budget(done, time.time() - t0, bar)
                last = self.step == self.total_steps
                val = ""
                if self.step % cfg.val_every == 0 or last:
                    v = self.validate()
                    val = f"{v:.5f}"
                    if v < self.best_val:
                        self.best_val = v
                        self.save("best.pt")
                writer.writerow([self.step, f"{lr_at(self.step - 1, cfg, self.total_steps):.6f}",
                                 f"{loss.item():.5f}", f"{parts['heatmap']:.5f}", f"{parts['size']:.4f}",
                                 f"{parts['offset']:.4f}", val, f"{time.time() - t0:.1f}"])
                if self.step % cfg.checkpoint_every == 0 or last:
                    log.flush()
                    self.save("last.pt")
                if bar:
                    bar.set_postfix(loss=f"{loss.item():.3f}", hm=f"{parts['heatmap']:.3f}")
                    bar.update(1)
        finally:
            if bar:
                bar.close()
            log.close()
        (self.out / "train_summary.json").write_text(json.dumps(
            {"steps": self.step, "best_val_loss": self.best_val, "config": asdict(cfg)}, indent=2))

    def _fit_to_budget(self, done: int, elapsed_s: float, bar) -> None:
        total = fitted_steps(done, elapsed_s, self.cfg.time_budget_s, self.step, self.cfg.steps)
        if abs(total - self.total_steps) > 0.02 * self.total_steps:  # the first fit, and real changes only
            print(f"time budget {self.cfg.time_budget_s:.0f} s: {total} steps at "
                  f"{elapsed_s / done * 1000:.0f} ms/step (configured {self.cfg.steps})", flush=True)
        self.total_steps = total
        if bar:
            bar.total = total
            bar.refresh()
