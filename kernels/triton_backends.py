"""Backends of the canonical ops: `torch.ops.autodeploy.<op>_triton`, and the table that names them.

Each backend is its own custom op with the canonical op's schema, so `select_backends` only swaps a
node's target and the graph stays valid (same arguments, same fake impl: the canonical op's, which
a backend's fake impl calls). The Triton kernel modules are imported on first call, because
`triton.jit` decides at decoration time whether to interpret (TRITON_INTERPRET=1 on CPU), and so
that registering these ops needs no Triton at all.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch._ops import OpOverload

from autodeploy.errors import RecipeError

# canonical op name -> backend name -> op. "torch" is the canonical op itself (the reference).
BACKENDS: dict[str, dict[str, OpOverload]] = {"attention": {"torch": torch.ops.autodeploy.attention.default}}


def pick_backend(what: str, available: dict, choice: str, device: torch.device) -> str:
    """The backend `choice` means among `available`: `auto` is Triton on CUDA (compiled there) and the
    torch reference elsewhere (on CPU Triton only interprets); an unknown name fails listing the valid."""
    if choice == "auto":
        return "triton" if device.type == "cuda" and "triton" in available else "torch"
    if choice not in available:
        raise RecipeError(f"{what} has no backend '{choice}' ({', '.join(available)}, auto)")
    return choice


def _lazy(module: str, function: str) -> Callable:
    def call(*args):
        return getattr(importlib.import_module(f".{module}", __package__), function)(*args)

    return call


def _register_triton(canonical: str, module: str) -> None:
    """`autodeploy::<canonical>_triton`: the function of the same name in kernels/<module>.py."""
    reference = getattr(torch.ops.autodeploy, canonical).default
    schema = str(reference._schema)
    op = torch.library.custom_op(
        f"autodeploy::{canonical}_triton", _lazy(module, canonical), mutates_args=(), schema=schema[schema.index("("):]
    )
    op.register_fake(lambda *args: reference(*args))
    BACKENDS[canonical] = {"torch": reference, "triton": getattr(torch.ops.autodeploy, f"{canonical}_triton").default}


_register_triton("rms_norm", "triton_rms_norm")
_register_triton("fused_add_rms_norm", "triton_rms_norm")
_register_triton("gated_act", "triton_gated_act")
_register_triton("rope", "triton_rope")
_register_triton("rope_pair", "triton_rope")
_register_triton("linear", "triton_linear")
_register_triton("gated_linear", "triton_linear")
_register_triton("add_rms_norm_linear", "triton_linear")
_register_triton("int_linear", "triton_quant_int_linear")
_register_triton("fp8_linear", "triton_quant_fp8_linear")
_register_triton("quantize_fp8_per_token", "triton_fp8_act_quant")
_register_triton("fp8_linear_quantized_input", "triton_quant_fp8_linear")
_register_triton("fused_add_rms_norm_quant_fp8", "triton_rms_norm")
_register_triton("gated_act_quant_fp8", "triton_gated_act")
_register_triton("moe", "triton_moe")
_register_triton("fp8_moe", "triton_moe")
