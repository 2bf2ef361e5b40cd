"""`--quantization` / `--kv-cache-dtype`, shared by optimize, generate, chat, serve and bench.

Flags become recipe overrides of the `quantization:` section, so the recipe stays the one place
that validates them (an unknown scheme is a one-line error, exit code 2).
"""

from __future__ import annotations

import argparse

from .settings import ALGOS, KV_CACHE_DTYPES


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--quantization", default=None, metavar="SCHEME",
                   help=f"weights: {' | '.join(ALGOS)} (default auto: what the checkpoint says, else none)")
    g.add_argument("--kv-cache-dtype", default=None, metavar="DTYPE",
                   help=f"KV cache: {' | '.join(KV_CACHE_DTYPES)} (default auto: the model dtype)")


def quantization_overrides(args: argparse.Namespace) -> list[str]:
    overrides = []
    if getattr(args, "quantization", None) is not None:
        overrides.append(f"quantization.algo={args.quantization}")
    if getattr(args, "kv_cache_dtype", None) is not None:
        overrides.append(f"quantization.kv_cache_dtype={args.kv_cache_dtype}")
    return overrides
