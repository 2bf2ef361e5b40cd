"""Recognise a short causal depthwise convolution over the sequence (Mamba, gated delta nets, LFM2).

HF writes it as `conv1d(x [b, c, s], w [c, 1, k], bias, padding=k - 1, groups=c)[..., :s]` (its
`nn.Conv1d` and the torch fallback of `causal_conv1d_fn` alike): left-padding by k - 1 and keeping
the first s outputs makes output t see inputs t - k + 1 .. t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import bind_args, sole_user, strip, val

aten = torch.ops.aten


@dataclass
class CausalConvMatch:
    output: Node  # [b, c, s]
    x: Node  # [b, c, s]
    weight: Node  # [c, 1, k]
    bias: Node | None


def match_causal_conv(node: Node) -> CausalConvMatch | None:
    """Anchor: a depthwise conv1d with k - 1 padding whose only user keeps its first s outputs."""
    if not is_op(node, aten.conv1d):
        return None
    args = bind_args(node)
    x, weight = args["input"], args["weight"]
    x_val, w_val = val(x), val(weight)
    if x_val is None or w_val is None or x_val.dim() != 3 or w_val.dim() != 3:
        return None
    channels, per_group, k = w_val.shape
    if per_group != 1 or args["groups"] != channels or x_val.shape[1] != channels:
        return None
    if list(args["stride"]) != [1] or list(args["dilation"]) != [1] or list(args["padding"]) != [k - 1]:
        return None
    cut = sole_user(node)
    if cut is None or not is_op(cut, aten.slice) or cut.args[1] % 3 != 2 or (cut.args[2] if len(cut.args) > 2 else 0):
        return None
    if val(cut) is None or val(cut).shape != x_val.shape:
        return None
    return CausalConvMatch(cut, strip(x, exact=True), weight, args["bias"])
