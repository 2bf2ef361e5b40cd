"""Tensor and expert parallelism: settings, checkpoint slices per rank, and the multi-rank runtime."""
