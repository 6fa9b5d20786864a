"""TensorRT engine builds: per-target recipes (``recipes/*.json``), :mod:`~engines.recipe` (load and
validate), :mod:`~engines.builder` (TensorRT's Python API, imported lazily; the engine and its
:class:`edge.engine_manifest.EngineManifest` written side by side; rebuilt only when an input changed).
"""
