"""On-device CT lung-nodule detection runtime.

Lean by design: NumPy, pydicom, OpenCV and ONNX Runtime only. torch is never
imported here; TensorRT and pycuda are imported lazily where they are used.
"""

__version__ = "0.1.0"
