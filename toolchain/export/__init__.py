"""PyTorch checkpoint -> one self-describing ONNX model file, cleaned and parity-checked.

Modules: :mod:`~toolchain.export.onnx_export` (checkpoint loading, torch -> ONNX,
metadata), :mod:`~toolchain.export.graph_cleanup` (onnx-graphsurgeon passes),
:mod:`~toolchain.export.parity` (ONNX Runtime vs PyTorch on real preprocessed slices).
"""
