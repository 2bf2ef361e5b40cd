"""autodeploy::moe against a naive per-token loop, for several shapes, top-k and routing functions."""

import pytest
import torch
import torch.nn.functional as F

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.gated_act import ACTIVATIONS


def route(logits: torch.Tensor, top_k: int, scoring: str, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (Mixtral/Qwen) or sigmoid (DeepSeek-V3) routing -> (ids, weights)."""
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    weights, ids = scores.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def naive_moe(x, ids, weights, w_gate_up, w_down, activation, b_gate_up=None, b_down=None):
    act = ACTIVATIONS[activation]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = w_gate_up[e] @ x[t] + (b_gate_up[e] if b_gate_up is not None else 0)
            gate, up = gate_up.chunk(2)
            y = w_down[e] @ (act(gate) * up) + (b_down[e] if b_down is not None else 0)
            out[t] += weights[t, k] * y
    return out


def make(tokens, hidden, inter, experts, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    router = torch.randn(tokens, experts, generator=g)
    biases = (torch.randn(experts, 2 * inter, generator=g), torch.randn(experts, hidden, generator=g)) if bias else (None, None)
    return x, w_gate_up, w_down, router, biases


@pytest.mark.parametrize("tokens,hidden,inter,experts", [(1, 8, 4, 2), (7, 16, 8, 4), (33, 32, 24, 8)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("scoring,normalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_moe_matches_per_token_loop(tokens, hidden, inter, experts, top_k, scoring, normalize):
    x, w_gate_up, w_down, router, _ = make(tokens, hidden, inter, experts, bias=False)
    ids, weights = route(router, top_k, scoring, normalize)
    got = torch.ops.autodeploy.moe(x, ids, weights, w_gate_up, w_down, "silu")
    torch.testing.assert_close(got, naive_moe(x, ids, weights, w_gate_up, w_down, "silu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_moe_biases_and_activations(activation):
    x, w_gate_up, w_down, router, (b1, b2) = make(9, 16, 8, 4, bias=True)
    ids, weights = route(router, 2, "softmax", True)
    got = torch.ops.autodeploy.moe(x, ids, weights, w_gate_up, w_down, activation, b1, b2)
    torch.testing.assert_close(got, naive_moe(x, ids, weights, w_gate_up, w_down, activation, b1, b2),
                               rtol=1e-5, atol=1e-5)


def test_moe_keeps_leading_dims_and_dtype():
    x, w_gate_up, w_down, router, _ = make(6, 16, 8, 4, bias=False)
    ids, weights = route(router, 2, "softmax", True)
    flat = torch.ops.autodeploy.moe(x, ids, weights, w_gate_up, w_down, "silu")
    batched = torch.ops.autodeploy.moe(x.view(2, 3, 16), ids.view(2, 3, 2), weights.view(2, 3, 2), w_gate_up, w_down, "silu")
    torch.testing.assert_close(batched.view(6, 16), flat)
    half = torch.ops.autodeploy.moe(x.bfloat16(), ids, weights.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16(), "silu")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), flat, rtol=5e-2, atol=5e-2)


def test_moe_unused_experts_and_fake_impl():
    x, w_gate_up, w_down, _, _ = make(5, 16, 8, 4, bias=False)
    ids = torch.zeros(5, 1, dtype=torch.long)  # every token to expert 0, experts 1..3 idle
    weights = torch.ones(5, 1)
    got = torch.ops.autodeploy.moe(x, ids, weights, w_gate_up, w_down, "silu")
    gate, up = F.linear(x, w_gate_up[0]).chunk(2, dim=-1)
    torch.testing.assert_close(got, F.linear(F.silu(gate) * up, w_down[0]), rtol=1e-5, atol=1e-5)
    meta = torch.ops.autodeploy.moe(x.to("meta"), ids.to("meta"), weights.to("meta"), w_gate_up.to("meta"),
                                    w_down.to("meta"), "silu")
    assert meta.shape == x.shape and meta.device.type == "meta"


def test_moe_opcheck():
    x, w_gate_up, w_down, router, _ = make(7, 16, 8, 4, bias=False)
    ids, weights = route(router, 2, "softmax", True)
    torch.library.opcheck(torch.ops.autodeploy.moe.default, (x, ids, weights, w_gate_up, w_down, "silu"),
                          test_utils=("test_schema", "test_faketensor"))
