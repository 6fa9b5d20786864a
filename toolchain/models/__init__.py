"""Detector architectures (PyTorch)."""
