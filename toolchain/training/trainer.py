"""Deterministic, resumable training loop for the detector (CPU friendly).

Each step draws its batch from an RNG seeded by (seed, step), so a run resumed
from a checkpoint continues with exactly the batches it would have seen.
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

from toolchain.training.losses import detection_loss
from toolchain.training.sampling import CropSampler, collate


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def to_tensors(batch):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in batch]


class Trainer:
    """Trains ``model`` on crops from ``sampler``; ``loss_fn(model, x, targets) -> (loss, parts)``."""

    def __init__(self, model, sampler: CropSampler, val_sampler: Optional[CropSampler], cfg: TrainConfig, out_dir,
                 checkpoint_extra: dict, loss_fn: Optional[Callable] = None, progress: bool = True):
        self.model = model
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
        self.best_val = float("inf")
        self._val_cache = None

    # checkpoints
    def save(self, name: str):
        state = dict(self.extra)
        state.update(state_dict=self.model.state_dict(), optimizer=self.opt.state_dict(), step=self.step,
                     best_val=self.best_val, train_config=asdict(self.cfg))
        tmp = self.out / (name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / name)

    def resume(self, path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_val = float(state.get("best_val", float("inf")))

    def _batch(self, sampler, rng):
        return to_tensors(collate([sampler.sample(rng) for _ in range(self.cfg.batch_size)]))

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

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)
        t0 = time.time()
        self.model.train()
        try:
            while self.step < cfg.steps:
                torch.manual_seed(cfg.seed * 1_000_003 + self.step)
                rng = np.random.default_rng([cfg.seed, self.step])
                x, *targets = self._batch(self.sampler, rng)
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(self.step, cfg)
                loss, parts = self.loss_fn(self.model, x, targets)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
                self.opt.step()
                self.step += 1
                val = ""
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    v = self.validate()
                    val = f"{v:.5f}"
                    if v < self.best_val:
                        self.best_val = v
                        self.save("best.pt")
                writer.writerow([self.step, f"{lr_at(self.step - 1, cfg):.6f}", f"{loss.item():.5f}",
                                 f"{parts['heatmap']:.5f}", f"{parts['size']:.4f}", f"{parts['offset']:.4f}", val,
                                 f"{time.time() - t0:.1f}"])
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
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
