"""Inference backends behind one narrow interface (:class:`edge.backends.base.Runner`)."""
