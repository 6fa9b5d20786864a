"""Distillation losses: the student learns the task and the teacher's outputs (and, optionally, features).

Terms (all on the output grid; the teacher runs in eval mode without gradients):

* task: :func:`toolchain.training.losses.detection_loss` on the ground truth;
* heatmap: ``focal_mse`` -- squared error between the student's and the
  teacher's sigmoid maps, each cell weighted by ``|p_s - p_t| ** gamma`` (easy
  background cells, where both agree, fade out; normalised by the teacher's
  heatmap mass, i.e. per nodule), or ``kl`` -- channel-wise distillation: per
  channel, a softmax over all cells of the logits at temperature T, KL(teacher
  || student) x T^2 (Shu et al., 2021);
* peaks (optional): at the cells the decoder reads as peaks -- 3x3 local
  maxima scoring >= ``peak_threshold`` in either network's map -- the
  Bernoulli KL from the teacher's score to the student's, averaged over those
  cells, so every candidate counts the same whatever its size (the dense
  heatmap term is dominated by large nodules, whose peaks cover many cells,
  while a 4 mm nodule is one cell);
* size/offset: L1 to the teacher's maps at cells where the teacher is
  confident (sigmoid >= ``confidence``), weighted by the teacher's score -- the
  teacher's regression carries information wherever it sees a nodule, not only
  at the labelled centre cell;
* feature imitation (optional): MSE between a 1x1 adapter conv of the
  student's last decoder features and the teacher's; the adapter is trained
  with the student and dropped at export.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edge.errors import ConfigError
from toolchain.training.losses import detection_loss
from toolchain.training.recipes import DEFAULT_DECODE

HEATMAP_LOSSES = ("focal_mse", "kl")


@dataclass(frozen=True)
class DistillConfig:
    task_weight: float = 1.0
    heatmap_weight: float = 1.0
    heatmap_loss: str = "focal_mse"
    gamma: float = 1.0  # focal_mse modulation
    temperature: float = 1.0  # kl
    regression_weight: float = 1.0
    size_weight: float = 0.1  # within the regression term, as detection_loss weighs size
    confidence: float = 0.3
    feature_weight: float = 0.0  # 0: no feature imitation (no adapter)
    peak_weight: float = 0.0  # 0: no peak matching
    peak_threshold: float = DEFAULT_DECODE.score_threshold  # where the models' decoder starts reading peaks

    def check(self) -> None:
        if self.heatmap_loss not in HEATMAP_LOSSES:
            raise ConfigError(f"heatmap loss must be one of {', '.join(HEATMAP_LOSSES)}, got {self.heatmap_loss!r}")
        for name in ("task_weight", "heatmap_weight", "regression_weight", "size_weight", "feature_weight", "gamma",
                     "peak_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0.0 < self.peak_threshold < 1.0:
            raise ConfigError(f"peak threshold must be in (0, 1), got {self.peak_threshold}")


def heatmap_focal_mse(student_logits, teacher_logits, gamma: float = 1.0):
    """Focal-weighted squared error of the sigmoid maps, normalised by the teacher's heatmap mass."""
    ps = torch.sigmoid(student_logits)
    pt = torch.sigmoid(teacher_logits)
    diff = ps - pt
    weight = diff.detach().abs() ** gamma
    return (weight * diff * diff).sum() / pt.sum().clamp(min=1.0)


def heatmap_channel_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """Channel-wise distillation: KL between per-channel spatial softmaxes of the logits, times T^2."""
    n, c = student_logits.shape[:2]
    s = F.log_softmax(student_logits.reshape(n * c, -1) / temperature, dim=1)
    t = F.log_softmax(teacher_logits.reshape(n * c, -1) / temperature, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature ** 2 / (n * c)


def peak_cells(prob, threshold: float, kernel: int = DEFAULT_DECODE.nms_kernel):
    """Boolean map of the cells the decoder would read as peaks: ``kernel`` local maxima >= ``threshold``.

    The torch counterpart of :func:`edge.decode.peaks.local_maxima` (NumPy, on the device) for training
    batches, except that every cell of a plateau counts (the decoder keeps the first in raster order).
    """
    return (prob == F.max_pool2d(prob, kernel, 1, kernel // 2)) & (prob >= threshold)


def peak_matching(student_logits, teacher_logits, threshold: float):
    """Bernoulli KL(teacher || student) at either network's peak cells, each peak weighted equally (0 if none)."""
    pt = torch.sigmoid(teacher_logits)
    with torch.no_grad():
        mask = (peak_cells(pt, threshold) | peak_cells(torch.sigmoid(student_logits), threshold)).to(pt.dtype)
    # cross-entropy minus the teacher's own entropy: 0 exactly where the scores agree
    kl = (F.binary_cross_entropy_with_logits(student_logits, pt, reduction="none")
          - F.binary_cross_entropy_with_logits(teacher_logits, pt, reduction="none"))
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def confident_regression(student, teacher, teacher_prob, confidence: float):
    """L1 to the teacher's map at cells where ``teacher_prob >= confidence``, weighted by ``teacher_prob``."""
    weight = teacher_prob * (teacher_prob >= confidence).to(teacher_prob.dtype)
    weight = weight.expand_as(student)
    return (torch.abs(student - teacher) * weight).sum() / weight.sum().clamp(min=1e-6)


def decoder_output(model: nn.Module) -> nn.Module:
    """The module whose output is the detector's last shared features (what the heads read)."""
    return model.dec[-1] if len(model.dec) else model.enc[0]


class FeatureTap:
    """Keeps the latest output of a module (a forward hook)."""

    def __init__(self, module: nn.Module):
        self.value = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output):
        self.value = output

    def remove(self) -> None:
        self._handle.remove()


class StudentNet(nn.Module):
    """The trained module: the student plus the feature adapter (None without feature imitation).

    ``forward`` returns the student's (heatmap logits, size, offset) and the
    adapted last decoder features (None without an adapter), so a
    DistributedDataParallel wrapper sees every trained parameter in one forward.
    """

    def __init__(self, student: nn.Module, adapter: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.adapter = adapter
        self._tap = FeatureTap(decoder_output(student)) if adapter is not None else None

    def forward(self, x):
        hm, size, off = self.student(x)
        feat = self.adapter(self._tap.value) if self.adapter is not None else None
        return hm, size, off, feat


def make_adapter(student: nn.Module, teacher: nn.Module) -> nn.Conv2d:
    """1x1 conv from the student's last decoder width to the teacher's."""
    cin = decoder_output(student).block[-1][0].out_channels
    cout = decoder_output(teacher).block[-1][0].out_channels
    return nn.Conv2d(cin, cout, 1, bias=False)


class DistillLoss:
    """``loss_fn(net, x, targets) -> (loss, parts)`` for :class:`~toolchain.training.trainer.Trainer`.

    ``net`` is the student itself or a :class:`StudentNet` (needed for feature
    imitation; possibly inside DistributedDataParallel). Without a teacher only
    the task loss is used (fine-tuning, training from scratch). ``parts`` has
    the task terms under ``heatmap``/``size``/``offset`` (what the trainer
    logs) and the distillation terms under ``kd_*``.
    """

    def __init__(self, teacher: Optional[nn.Module], cfg: DistillConfig = DistillConfig()):
        cfg.check()
        self.cfg = cfg
        self.teacher = teacher
        self._teacher_tap = None
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if cfg.feature_weight > 0:
                self._teacher_tap = FeatureTap(decoder_output(teacher))

    def __call__(self, net, x, targets):
        outputs = net(x)
        hm, size, off = outputs[:3]
        feat = outputs[3] if len(outputs) > 3 else None
        cfg = self.cfg
        task, parts = detection_loss((hm, size, off), targets)
        total = cfg.task_weight * task
        if self.teacher is None:
            return total, parts
        with torch.no_grad():
            t_hm, t_size, t_off = self.teacher(x)
        if cfg.heatmap_loss == "kl":
            kd_hm = heatmap_channel_kl(hm, t_hm, cfg.temperature)
        else:
            kd_hm = heatmap_focal_mse(hm, t_hm, cfg.gamma)
        t_prob = torch.sigmoid(t_hm)
        kd_reg = (cfg.size_weight * confident_regression(size, t_size, t_prob, cfg.confidence)
                  + confident_regression(off, t_off, t_prob, cfg.confidence))
        total = total + cfg.heatmap_weight * kd_hm + cfg.regression_weight * kd_reg
        parts.update(kd_heatmap=kd_hm.item(), kd_regression=kd_reg.item())
        if cfg.peak_weight > 0:
            kd_peak = peak_matching(hm, t_hm, cfg.peak_threshold)
            total = total + cfg.peak_weight * kd_peak
            parts["kd_peak"] = kd_peak.item()
        if cfg.feature_weight > 0:
            if feat is None:
                raise ValueError("feature imitation needs a StudentNet with an adapter")
            kd_feat = F.mse_loss(feat, self._teacher_tap.value)
            total = total + cfg.feature_weight * kd_feat
            parts["kd_feature"] = kd_feat.item()
        return total, parts
