"""Model compression: structured channel pruning and distillation of the detector into a deployable student.

Modules: :mod:`~toolchain.compression.arch` (per-conv widths: the architecture
pruning leaves), :mod:`~toolchain.compression.flops` (parameters and MACs),
:mod:`~toolchain.compression.pruning` (Torch-Pruning, iterative prune +
fine-tune), :mod:`~toolchain.compression.distill` (distillation losses),
:mod:`~toolchain.compression.student` (student training loop, single process or
DDP), :mod:`~toolchain.compression.ddp` (torchrun / gloo process group),
:mod:`~toolchain.compression.report` (the compression table).
"""
