"""Capture an HF causal LM as an FX GraphModule with `torch.export` (dynamic batch and sequence).

The model is exported on the meta device: no weights need to exist yet. The graph's interface is
`(input_ids[b, s], position_ids[b, s]) -> logits[b, s, vocab]`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import UnsupportedModelError
from ..graph_utils import graph_modules
from .patches import apply_export_patches

# The wrapper holds the HF model under this attribute, so graph parameter names carry this prefix.
WRAPPER_PREFIX = "model."
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8


class CausalLMLogits(nn.Module):
    """Exposes `model(input_ids, position_ids).logits` without a KV cache, for export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def example_inputs(batch: int, seq: int, device: torch.device | str = "meta") -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq).contiguous()
    return input_ids, position_ids


def _drop_inference_noops(gm: GraphModule) -> None:
    """Drop nodes that mean nothing for inference but pin things down.

    export pins every cast's device (meta here) with `_assert_tensor_metadata`, and marks lifted
    constants with the in-place `detach_`, which dead-code elimination must keep; both go, so a
    subgraph a pattern replaces (e.g. HF's mask) can die with its constants.
    """
    for module in graph_modules(gm):
        for node in list(module.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                module.graph.erase_node(node)
            elif node.target is torch.ops.aten.detach_.default:
                node.replace_all_uses_with(node.args[0])
                module.graph.erase_node(node)
        module.recompile()


def export_causal_lm(model: nn.Module, max_batch_size: int = 256, max_seq_len: int = 8192) -> GraphModule:
    """Export `model` (normally on meta) to a GraphModule with dynamic batch and sequence dimensions."""
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    dims = {0: batch, 1: seq}
    args = example_inputs(_EXAMPLE_BATCH, _EXAMPLE_SEQ, device=next(model.parameters()).device)
    try:
        with apply_export_patches(model):
            program = torch.export.export(
                CausalLMLogits(model),
                args,
                dynamic_shapes=(dims, dims),
                strict=False,
                # torch 2.11 cannot simplify stride guards such as Min(64*s, 192*s) == 64*s (from the
                # contiguity checks of transposed/expanded K/V); they hold for every s >= 1 but, as
                # guards, violate the declared seq range. Deferred, they become runtime asserts.
                prefer_deferred_runtime_asserts_over_guards=True,
            )
    except Exception as e:  # keep the first line: export errors are long
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"torch.export failed for {type(model).__name__}: {first}") from e
    gm = program.module()
    _drop_inference_noops(gm)
    return gm


def dataless_constants(gm: GraphModule) -> list[str]:
    """Tensor constants the graph still reads that have no data.

    A tensor the model creates inside its forward (e.g. `torch.tensor(0.0, device=x.device)` in HF's
    mask code) is exported on meta as a constant without data. Many die with the subgraph a pattern
    replaces (the attention mask), so this is checked when weights load, not at export.
    """
    found = []
    for module in graph_modules(gm):
        known = {id(t) for t in list(module.parameters()) + list(module.buffers())}
        for node in module.graph.nodes:
            if node.op != "get_attr":
                continue
            value = getattr(module, node.target, None) if "." not in node.target else _resolve(module, node.target)
            if isinstance(value, torch.Tensor) and value.is_meta and id(value) not in known:
                found.append(node.target)
    return found


def _resolve(module: nn.Module, target: str):
    path, _, attr = target.rpartition(".")
    return getattr(module.get_submodule(path), attr, None)
