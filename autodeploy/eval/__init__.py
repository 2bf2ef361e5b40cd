"""Accuracy evaluation of optimized models (perplexity of a fixed text)."""
