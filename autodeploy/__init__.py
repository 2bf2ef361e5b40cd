"""autodeploy: export any HF causal LM, rewrite its graph with transforms, run it fast."""

__version__ = "0.1.0"
