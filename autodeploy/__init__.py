"""autodeploy: export any HF causal LM, rewrite its graph with transforms, run it fast."""

from .source_tree import keep_checkout_root_off_path

__version__ = "0.1.0"
keep_checkout_root_off_path()

_LAZY = {"LLM": "autodeploy.llm", "SamplingParams": "autodeploy.llm", "RequestOutput": "autodeploy.llm"}


def __getattr__(name: str):
    """`from autodeploy import LLM, SamplingParams` without importing torch for every CLI call."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autodeploy' has no attribute '{name}'")
