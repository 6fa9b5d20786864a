"""The runner interface every inference backend implements.

Modelled on Polygraphy's ``BaseRunner``: ``activate()`` acquires resources
(sessions, CUDA contexts, engines), ``infer()`` validates the feed and calls
the backend's ``_infer_impl``, ``deactivate()`` releases. Runners are context
managers.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from edge.errors import EdgeError


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of a model input or output (None for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: Tuple[Optional[int], ...]


class Runner:
    """Base class: subclasses implement ``_activate_impl``, ``_infer_impl``,
    ``_deactivate_impl`` and ``_input_metadata_impl``."""

    name = "runner"

    def __init__(self):
        self.is_active = False

    def activate(self) -> "Runner":
        if self.is_active:
            raise RuntimeError(f"{self.name} is already active")
        self._activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def input_metadata(self) -> Dict[str, TensorMeta]:
        self._require_active()
        return self._input_metadata_impl()

    def infer(self, feed: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        """Run one inference. Validates names, dtypes and static dims of ``feed``."""
        self._require_active()
        meta = self._input_metadata_impl()
        missing = sorted(set(meta) - set(feed))
        extra = sorted(set(feed) - set(meta))
        if missing or extra:
            raise EdgeError(f"{self.name}: feed inputs do not match the model (missing: {missing}, unexpected: {extra})")
        for name, m in meta.items():
            arr = feed[name]
            if arr.dtype != m.dtype:
                raise EdgeError(f"{self.name}: input {name!r} has dtype {arr.dtype}, the model expects {m.dtype}")
            if len(arr.shape) != len(m.shape) or any(
                want is not None and want != got for want, got in zip(m.shape, arr.shape)
            ):
                raise EdgeError(f"{self.name}: input {name!r} has shape {arr.shape}, the model expects {m.shape}")
        return self._infer_impl(feed)

    def _require_active(self):
        if not self.is_active:
            raise RuntimeError(f"{self.name} must be activated before use")

    # Backend hooks
    def _activate_impl(self):
        raise NotImplementedError

    def _deactivate_impl(self):
        raise NotImplementedError

    def _input_metadata_impl(self) -> Dict[str, TensorMeta]:
        raise NotImplementedError

    def _infer_impl(self, feed):
        raise NotImplementedError
