"""Raw CT frame -> network input. One spec (:mod:`.spec`), three implementations:
a float64 NumPy reference, a fast OpenCV CPU path, and a fused CUDA kernel."""
