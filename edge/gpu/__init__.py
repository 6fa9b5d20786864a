"""GPU path of the runtime: pycuda context, zero-copy frame buffers, the double-buffered slice pipeline.

Nothing here imports pycuda at module import: the CPU-only runtime imports
this package freely, and a missing pycuda surfaces as MissingDependencyError
when a GPU object is created.
"""
