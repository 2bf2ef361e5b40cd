"""Named graph transforms. Importing this package registers every built-in transform."""

from .registry import TRANSFORMS, Stage, Transform, TransformConfig, TransformContext, TransformReport, register

__all__ = ["TRANSFORMS", "Stage", "Transform", "TransformConfig", "TransformContext", "TransformReport", "register"]

from . import load_weights  # noqa: E402,F401  (registers the transform)
