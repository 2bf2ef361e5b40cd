"""Recognise linear layers: aten.linear(x, weight, bias?), as HF's nn.Linear exports."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import bind_args

aten = torch.ops.aten


@dataclass
class LinearMatch:
    output: Node
    x: Node
    weight: Node
    bias: Node | None


def match_linear(node: Node) -> LinearMatch | None:
    """Anchor: aten.linear. (addmm/matmul forms such as GPT-2's Conv1D are not recognised.)"""
    if not is_op(node, aten.linear):
        return None
    args = bind_args(node)
    return LinearMatch(node, args["input"], args["weight"], args["bias"])
