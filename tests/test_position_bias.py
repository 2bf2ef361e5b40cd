"""Additive score terms read from the graph: ALiBi becomes the canonical op's slopes (eager and sdpa
forms), a plain mask adds nothing, and a bias of another form leaves the attention unmatched."""

import pytest
import torch
import torch.nn.functional as F

from autodeploy.graph_utils import is_op
from test_patterns import D, H, Attention, Fn, _causal, _qkv, rewrite

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])  # one per head (H = 4)


def _alibi(s: int) -> torch.Tensor:
    """MPT-style: slope * (key - (s - 1)), computed in the forward from constants only."""
    return SLOPES.view(1, H, 1, 1) * (torch.arange(s) - (s - 1)).float().view(1, 1, 1, s)


def _eager_alibi_masked_fill(self, q, k, v, mask):
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * 0.3 + _alibi(q.shape[2])
    return torch.matmul(F.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), dim=-1), v)


def _sdpa_alibi_in_mask(self, q, k, v, mask):
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    additive = _alibi(q.shape[2]) + torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=0.3)


def _eager_quadratic_bias(self, q, k, v, mask):
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q.shape[2]
    distance = (torch.arange(s).view(1, s) - torch.arange(s).view(s, 1)).float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * 0.3 + 0.01 * distance**2
    return torch.matmul(F.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), dim=-1), v)


@pytest.mark.parametrize("fn", [_eager_alibi_masked_fill, _sdpa_alibi_in_mask], ids=["eager-masked_fill", "sdpa"])
def test_alibi_becomes_slopes(fn):
    module = Fn(lambda self, *a: self.attn(*a), attn=Attention(fn))
    gm, matched = rewrite(module, (*_qkv(), _causal()), "match_attention")  # also checks outputs are unchanged
    assert matched == {"attention": 1}
    (node,) = [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.attention)]
    slopes = node.args[6]
    torch.testing.assert_close(getattr(gm, slopes.target), SLOPES)


def test_plain_mask_has_no_slopes():
    def eager_plain(self, q, k, v, mask):
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * D**-0.5
        return torch.matmul(F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), v)

    gm, matched = rewrite(Fn(lambda self, *a: self.attn(*a), attn=Attention(eager_plain)),
                          (*_qkv(), _causal()), "match_attention")
    assert matched == {"attention": 1}
    (node,) = [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.attention)]
    assert len(node.args) == 6


def test_other_bias_is_left_alone():
    module = Fn(lambda self, *a: self.attn(*a), attn=Attention(_eager_quadratic_bias))
    assert rewrite(module, (*_qkv(), _causal()), "match_attention")[1] == {"attention": 0}


def test_a_bias_learned_from_the_hidden_states_is_not_taken_for_a_mask():
    """Inkling's relative position logits come from a projection of the model's activations: the weights make the
    term impossible to evaluate, which used to count as a mask, dropped from the scores (logits 3.2e-3 of the max
    apart, decode otherwise right). A term computed from a parameter is a learned bias: the attention stays HF's,
    and the reason is recorded for insert_kv_cache, which then refuses a cache."""
    from autodeploy.transforms.match_attention import UNMATCHED_KEY

    def eager_learned_bias(self, q, k, v, mask):
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        bias = self.relative(q.transpose(1, 2)).permute(0, 2, 1, 3)[..., :q.shape[2]]  # [b, h, s, s] from weights
        scores = torch.matmul(q, k.transpose(-1, -2)) * 0.3 + bias
        return torch.matmul(F.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), dim=-1), v)

    attention = Attention(eager_learned_bias)
    attention.relative = torch.nn.Linear(D, 16)
    gm, matched = rewrite(Fn(lambda self, *a: self.attn(*a), attn=attention), (*_qkv(), _causal()), "match_attention")
    assert matched == {"attention": 0}
    assert "learned bias" in gm.meta[UNMATCHED_KEY][0]
