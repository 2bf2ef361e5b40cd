"""Recognise linear layers, in the forms HF code exports them:
  aten.linear(x, W, b)                                  nn.Linear
  matmul(x, W.T) (+ b)                                  Falcon's FalconLinear: `x @ self.weight.T + self.bias`
  addmm(b, x.view(-1, in), W).view(..., out)            GPT-2's Conv1D, W stored [in, out]
(mm / matmul / addmm with either weight layout, with or without the bias and the 2-D views.)

The weight must be a parameter (a get_attr of an nn.Parameter): a matmul of two activations, or of
an activation and a buffer, is not a layer the checkpoint, quantization or sharding know about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Node

from autodeploy.graph_utils import is_op

from .helpers import VIEWS, bind_args, sole_user, val

aten = torch.ops.aten
_TRANSPOSES = (aten.t, aten.numpy_T, aten.mT, aten.transpose, aten.permute)


@dataclass
class LinearMatch:
    output: Node
    x: Node
    weight: Node
    bias: Node | None
    transposed: bool = False  # weight stored [in, out] (Conv1D): the canonical op takes weight.T


def _is_parameter(node: Any) -> bool:
    if not isinstance(node, Node) or node.op != "get_attr":
        return False
    try:
        return isinstance(node.graph.owning_module.get_parameter(node.target), nn.Parameter)
    except AttributeError:
        return False


def _is_matrix_transpose(node: Node) -> bool:
    """Whether `node` swaps the two dims of a 2-D tensor (t, .T, .mT, transpose(0, 1), permute(1, 0))."""
    if not is_op(node, _TRANSPOSES) or val(node.args[0]).dim() != 2:
        return False
    if is_op(node, aten.transpose):
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    if is_op(node, aten.permute):
        return [d % 2 for d in node.args[1]] == [1, 0]
    return True


def _weight(operand: Any) -> tuple[Node, bool] | None:
    """The right operand of x @ w as (parameter, stored [in, out]), for w = W.T or a 2-D W itself."""
    if isinstance(operand, Node) and _is_matrix_transpose(operand) and _is_parameter(operand.args[0]):
        return operand.args[0], False
    if _is_parameter(operand) and val(operand).dim() == 2:
        return operand, True
    return None


def _matmul_operands(node: Node) -> tuple[Any, Any, Any] | None:
    """(x, w, bias or None) of matmul(x, w), mm(x, w), addmm(bias, x, w) with beta = alpha = 1."""
    if is_op(node, (aten.matmul, aten.mm)):
        return node.args[0], node.args[1], None
    if is_op(node, aten.addmm):
        args = bind_args(node)
        if args["beta"] == 1 and args["alpha"] == 1:
            return args["mat1"], args["mat2"], args["self"]
    return None


def _is_bias(bias: Any, product: Node) -> bool:
    """A 1-D tensor of the output features, in the product's dtype (what linear's bias must be)."""
    b, out = val(bias), val(product)
    return b is not None and b.dim() == 1 and b.shape[0] == out.shape[-1] and b.dtype == out.dtype


def _bias_add(product: Node) -> tuple[Node, Node] | None:
    """product + b as the product's only use, b a bias -> (the add, b)."""
    add = sole_user(product)
    if add is None or not is_op(add, aten.add) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    bias = add.args[1] if add.args[0] is product else add.args[0]
    return (add, bias) if _is_bias(bias, product) else None


def _unflattened(x: Any, output: Node) -> tuple[Any, Node]:
    """(x, output) without Conv1D's flatten to 2-D and view back, when both are there.

    x2d = x.view(-1, in) flattens only the leading dims, and the view back restores them, so the
    linear on x (any rank) gives the same values in the final shape.
    """
    back = sole_user(output)
    if not is_op(x, VIEWS) or back is None or not is_op(back, VIEWS):
        return x, output
    source = x.args[0]
    if val(source).shape[-1] == val(x).shape[-1] and val(back).shape[:-1] == val(source).shape[:-1]:
        return source, back
    return x, output


def _matmul_linear(node: Node) -> LinearMatch | None:
    operands = _matmul_operands(node)
    weight = _weight(operands[1]) if operands is not None else None
    if weight is None:
        return None
    x, _, bias = operands
    output = node
    if bias is None:
        output, bias = _bias_add(node) or (node, None)
    elif not _is_bias(bias, node):
        return None
    x, output = _unflattened(x, output)
    return LinearMatch(output, x, weight[0], bias, transposed=weight[1])


def match_linear(node: Node) -> LinearMatch | None:
    """Anchor: aten.linear, or the matmul / mm / addmm of a linear form (see module doc)."""
    if not is_op(node, aten.linear):
        return _matmul_linear(node)
    args = bind_args(node)
    return LinearMatch(node, args["input"], args["weight"], args["bias"])
