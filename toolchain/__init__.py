"""Offline toolchain library (workstation): phantom datasets, models, training,
pruning, distillation, export, evaluation. Scripts in tools/ are thin CLIs over it.
May import torch; edge/ must never import this package."""
