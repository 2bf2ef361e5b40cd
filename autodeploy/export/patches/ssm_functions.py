"""Route HF's state-space / linear-attention functions to the canonical ops while exporting.

Why: transformers (5.17 .. 5.24) runs Mamba-2 style scans (Bamba, Nemotron-H, Falcon-H1, Granite
hybrid, Zamba2, Mamba-2), Mamba-1 selective scans (Mamba, Falcon-Mamba, Jamba), gated delta rules
(Qwen3-Next, OLMo hybrid, Kimi linear, ...) and their short convolutions through module-level
functions of each modeling file (`mamba2_chunk_scan`, `mamba_selective_scan`,
`torch_chunk_gated_delta_rule`, `causal_conv1d_fn`), whose torch fallbacks pad the sequence to a
multiple of the chunk size or loop over its tokens: torch.export then fails ("Specializations
unexpectedly required (seq)"), and a whole-sequence scan could not carry state across steps anyway. During export each such function,
wherever a loaded modeling module defines it, is swapped for a call to the canonical op
(kernels/ssm.py) that `insert_state_cache` later gives a state slot. A call the canonical op does
not cover (an initial state, a finite upper dt limit, packed `seq_idx`) goes to HF's function.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import ExportPatch, register_patch

ops = torch.ops.autodeploy


def _covered(kwargs: dict, *names: str) -> bool:
    """Whether the optional arguments that would change the result are all absent."""
    return all(kwargs.get(name) is None for name in names)


def _causal_conv1d_fn(original: Callable) -> Callable:
    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        if not _covered(kwargs, "seq_idx", "initial_states", "conv_states") or activation not in (None, "silu", "swish"):
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        return ops.causal_conv1d(hidden_states, weight, bias, activation)
    return causal_conv1d_fn


def _chunk_gated_delta_rule(original: Callable) -> Callable:
    def chunk_gated_delta_rule(query, key, value, g, beta, *args, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, **kwargs):
        if args or initial_state is not None or output_final_state or not _covered(kwargs, "cu_seqlens"):
            return original(query, key, value, g, beta, *args, initial_state=initial_state,
                            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                            **kwargs)
        return ops.gated_delta_rule(query, key, value, g, beta, bool(use_qk_l2norm_in_kernel)), None
    return chunk_gated_delta_rule


def _mamba2_chunk_scan(original: Callable) -> Callable:
    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        dt_min = 0.0 if dt_limit is None else max(float(dt_limit[0]), 0.0)
        no_upper_limit = dt_limit is None or math.isinf(dt_limit[1])
        if (initial_states is not None or return_final_states or D is None or D.dim() != 1 or not no_upper_limit
                or not dt_softplus or not _covered(kwargs, "z", "seq_idx", "cu_seqlens")):
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
                            **kwargs)
        return ops.ssd_scan(hidden_states, dt, A, B, C, D, dt_bias, True, dt_min)
    return mamba2_chunk_scan


def _mamba_selective_scan(original: Callable) -> Callable:
    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, **kwargs):
        if return_last_state or D is None or B.dim() != 3 or C.dim() != 3:
            return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        out = ops.selective_scan(hidden_states, dt, A, B, C, D, delta_bias, bool(delta_softplus))
        return out if z is None else out * F.silu(z)
    return mamba_selective_scan


_REPLACEMENTS: dict[str, Callable[[Callable], Callable]] = {
    "causal_conv1d_fn": _causal_conv1d_fn,
    "torch_chunk_gated_delta_rule": _chunk_gated_delta_rule,
    "mamba2_chunk_scan": _mamba2_chunk_scan,
    "mamba_selective_scan": _mamba_selective_scan,
}


@contextlib.contextmanager
def _route_ssm_functions(model: nn.Module):
    swapped = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or ".modeling_" not in name or module is None:
            continue
        for function, make in _REPLACEMENTS.items():
            original = module.__dict__.get(function)
            if callable(original):
                setattr(module, function, make(original))
                swapped.append((module, function, original))
    try:
        yield
    finally:
        for module, function, original in swapped:
            setattr(module, function, original)


register_patch(ExportPatch(
    name="ssm_functions",
    why="HF's chunked scan / delta-rule / conv fallbacks pad to chunk multiples and cannot carry state",
    applies=lambda: True,  # transformers 5.17 .. 5.24 define these functions; older versions simply lack them
    patch=_route_ssm_functions,
))
