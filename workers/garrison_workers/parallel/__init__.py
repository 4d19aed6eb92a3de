"""Tensor and expert parallelism: one checked layout object, process groups, and the parallel layers."""
