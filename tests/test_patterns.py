"""Each pattern family on small exported modules: matched where it should, not where it should not,
the graph still lints and propagates fake shapes, and the output is unchanged by the rewrite.

The modules use transformers' own building blocks where they exist (RMSNorm classes,
apply_rotary_pos_emb, MLPs, eager_attention_forward, repeat_kv), so the graphs are the ones HF emits.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope
from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb as deepseek_v2_rope
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave as deepseek_v3_rope
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm, eager_attention_forward
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb as llama_rope
from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb as gpt_oss_rope
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_attention
from transformers.models.granitemoe_swa.modeling_granitemoe_swa import eager_attention_forward as granite_swa_attention
from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb as olmo2_rope
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.models.phi3.modeling_phi3 import Phi3MLP
from transformers.pytorch_utils import Conv1D

from autodeploy.graph_utils import finalize, graph_modules, is_op
from autodeploy.transforms import TRANSFORMS, TransformContext

ops = torch.ops.autodeploy
aten = torch.ops.aten
B, H, H_KV, S, D = 2, 4, 2, 7, 16
_CONFIG = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")


def _count(gm, op) -> int:
    return sum(is_op(n, op) for m in graph_modules(gm) for n in m.graph.nodes)


def rewrite(module: nn.Module, inputs: tuple, *names: str, config=_CONFIG) -> tuple[torch.fx.GraphModule, dict]:
    """Export `module`, run the named transforms, and check the graph is still valid and equivalent."""
    torch.manual_seed(0)
    gm = torch.export.export(module.eval(), inputs).module()
    for node in list(gm.graph.nodes):  # as export_causal_lm does: export's dtype/device pins go
        if is_op(node, torch.ops.aten._assert_tensor_metadata):
            gm.graph.erase_node(node)
    with torch.no_grad():
        before = gm(*inputs)
    ctx = TransformContext(SimpleNamespace(config=config), module, torch.device("cpu"), torch.float32)
    matched: dict[str, int] = {}
    for name in names:
        matched.update(TRANSFORMS[name]().apply(gm, ctx))
        finalize(gm)  # lints
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    with torch.no_grad():
        after = gm(*inputs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    return gm, matched


class Fn(nn.Module):
    """Wraps a function of tensors (and keeps optional submodules) so it can be exported."""

    def __init__(self, fn, **modules: nn.Module):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args):
        return self.fn(self, *args)


# --- rms_norm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_cls", [LlamaRMSNorm, Gemma2RMSNorm])
@pytest.mark.parametrize("shape", [(B, S, 32), (B, S, H, 32)], ids=["hidden", "per_head"])
def test_rms_norm(norm_cls, dtype, shape) -> None:
    norm = norm_cls(32, eps=1e-5)
    norm.weight.data = torch.randn(32)
    module = Fn(lambda self, x: self.norm(x) + 1, norm=norm.to(dtype))
    gm, matched = rewrite(module, (torch.randn(shape, dtype=dtype),), "match_rms_norm")
    assert matched == {"rms_norm": 1} and _count(gm, torch.ops.aten.rsqrt) == 0


def test_rms_norm_over_other_dim_is_not_matched() -> None:
    module = Fn(lambda self, x: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))
    assert rewrite(module, (torch.randn(S, 32),), "match_rms_norm")[1] == {"rms_norm": 0}


# --- rope ---------------------------------------------------------------------------------------


def _cos_sin(d: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.randn(B, S, d // 2)
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def _partial_rope(self, q, k, cos, sin):
    """NeoX / Phi style: rotate only the first half of the head dim."""
    (q_rot, q_pass), (k_rot, k_pass) = q.chunk(2, -1), k.chunk(2, -1)
    q_rot, k_rot = llama_rope(q_rot, k_rot, cos, sin)
    return torch.cat((q_rot, q_pass), -1), torch.cat((k_rot, k_pass), -1)


def _complex_rope(self, q, k, cos, sin):
    """DeepSeek-V2 / Meta Llama: pairs of q, k as complex numbers times freqs_cis (scaled, as yarn does)."""
    freqs_cis = torch.complex(cos[..., ::2], sin[..., ::2]) * 0.7
    return deepseek_v2_rope(q, k, freqs_cis)


ROPE_CASES = {  # fn, interleaved (the canonical op's form; the cos/sin inputs are in that layout), rotary dim
    "llama": (lambda self, q, k, c, s: llama_rope(q, k, c, s), False, D),
    "cohere": (lambda self, q, k, c, s: cohere_rope(q, k, c, s), True, D),
    "partial": (_partial_rope, False, D // 2),
    "complex": (_complex_rope, True, D),
    "split_pairs": (lambda self, q, k, c, s: deepseek_v3_rope(q, k, c, s), False, D),  # DeepSeek-V3
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_on_q_and_k(case: str) -> None:
    fn, interleaved, rot_dim = ROPE_CASES[case]
    q, k = torch.randn(B, H, S, D), torch.randn(B, H_KV, S, D)
    gm, matched = rewrite(Fn(fn), (q, k, *_cos_sin(rot_dim, interleaved)), "match_rope")
    assert matched == {"rope": 2}
    ropes = [n for n in gm.graph.nodes if is_op(n, ops.rope)]
    assert all(n.args[3] is interleaved for n in ropes)


def test_rope_in_float32_on_bf16_heads() -> None:
    """OLMo 2: float32 cos / sin on bf16 q / k, the sum in float32 cast back to bf16 (what the canonical op
    computes): the match ends at the cast, bit for bit."""
    q, k = torch.randn(B, H, S, D).bfloat16(), torch.randn(B, H_KV, S, D).bfloat16()
    gm, matched = rewrite(Fn(lambda self, q, k, c, s: olmo2_rope(q, k, c, s)), (q, k, *_cos_sin(D, False)),
                          "match_rope")
    assert matched == {"rope": 2} and _count(gm, torch.ops.aten.cat) == 0


def test_rope_on_chunked_halves() -> None:
    """GPT-OSS: x's halves from chunk(x, 2, -1) times half-size cos / sin, concatenated: rotate-half RoPE of x itself
    (no de-interleaving cat), with q and k sharing the repeated cos / sin so fuse_rope_pairs can pair them."""
    q, k = torch.randn(B, H, S, D), torch.randn(B, H_KV, S, D)
    freqs = torch.randn(B, S, D // 2)
    gm, matched = rewrite(Fn(lambda self, q, k, c, s: gpt_oss_rope(q, k, c, s)), (q, k, freqs.cos(), freqs.sin()),
                          "match_rope")
    assert matched == {"rope": 2}
    ropes = [n for n in gm.graph.nodes if is_op(n, ops.rope)]
    assert ropes[0].args[1] is ropes[1].args[1] and ropes[0].args[2] is ropes[1].args[2]
    assert [n.args[0].op for n in ropes] == ["placeholder", "placeholder"]  # x itself, not a cat of its halves


def test_rope_in_float32_without_the_cast_back_is_not_matched() -> None:
    """The float32 sum left in float32 is not the canonical op (which returns x's dtype)."""
    def float32_rope(self, x, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return x * cos + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin

    inputs = (torch.randn(B, H, S, D).bfloat16(), *_cos_sin(D, False))
    assert rewrite(Fn(float32_rope), inputs, "match_rope")[1] == {"rope": 0}


def test_rope_gptj_layout() -> None:
    """GPT-J rotates [b, s, h, d] before the head transpose, with half-size sin/cos."""
    freqs = torch.randn(B, S, D // 2)
    module = Fn(lambda self, x, sin, cos: gptj_rope(x, sin, cos))
    gm, matched = rewrite(module, (torch.randn(B, S, H, D), freqs.sin(), freqs.cos()), "match_rope")
    assert matched == {"rope": 1}


def test_rope_with_uneven_split_is_not_matched() -> None:
    def not_rope(self, x, cos, sin):
        return x * cos + torch.cat((-x[..., 5:], x[..., :5]), -1) * sin

    cos, sin = _cos_sin(D, False)
    inputs = (torch.randn(B, H, S, D), cos[:, None], sin[:, None])
    assert rewrite(Fn(not_rope), inputs, "match_rope")[1] == {"rope": 0}


def test_rope_split_pairs_with_wrong_sign_is_not_matched() -> None:
    def not_rope(self, x, cos, sin):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos - x1 * sin], dim=-1)

    freqs = torch.randn(B, 1, S, D // 2)
    inputs = (torch.randn(B, H, S, D), freqs.cos(), freqs.sin())
    assert rewrite(Fn(not_rope), inputs, "match_rope")[1] == {"rope": 0}


# --- attention ----------------------------------------------------------------------------------


def _qkv(h_kv: int = H_KV) -> tuple[torch.Tensor, ...]:
    return torch.randn(B, H, S, D), torch.randn(B, h_kv, S, D), torch.randn(B, h_kv, S, D)


def _causal(sliding_window: int | None = None) -> torch.Tensor:
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (j <= i) & ((j > i - sliding_window) if sliding_window else True)
    return allowed[None, None].expand(B, 1, S, S)


class Attention(nn.Module):
    """HF-shaped attention module: the transform reads is_causal / sliding_window from it."""

    def __init__(self, fn, sliding_window: int | None = None, is_causal: bool = True):
        super().__init__()
        self.fn, self.sliding_window, self.is_causal = fn, sliding_window, is_causal
        self.num_key_value_groups, self.head_dim = H // H_KV, D

    def forward(self, *args):
        return self.fn(self, *args)


def _hf_sdpa(self, q, k, v, mask):
    k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


def _gqa_sdpa(self, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _hf_eager(self, q, k, v, mask):
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return eager_attention_forward(self, q, k, v, additive, scaling=0.3, softcap=self.softcap)[0].transpose(1, 2)


def _eager_divided_no_repeat(self, q, k, v, mask):
    scores = torch.matmul(q, k.transpose(-1, -2)) / D**0.5
    scores = scores + torch.where(mask, 0.0, -1e9)
    return torch.matmul(F.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_attention_sdpa_with_repeat_kv_and_mask(sliding_window) -> None:
    module = Fn(lambda self, *a: self.attn(*a), attn=Attention(_hf_sdpa, sliding_window))
    gm, matched = rewrite(module, (*_qkv(), _causal(sliding_window)), "match_attention")
    assert matched == {"attention": 1}
    (node,) = [n for n in gm.graph.nodes if is_op(n, ops.attention)]
    assert tuple(node.args[1].meta["val"].shape) == (B, H_KV, S, D)  # repeat_kv stripped
    assert node.args[3:] == (0.3, sliding_window, None)
    assert _count(gm, (torch.ops.aten.scaled_dot_product_attention, torch.ops.aten.expand)) == 0


def test_attention_sdpa_enable_gqa_is_causal() -> None:
    module = Fn(lambda self, *a: self.attn(*a), attn=Attention(_gqa_sdpa))
    gm, matched = rewrite(module, _qkv(), "match_attention")
    assert matched == {"attention": 1}
    assert [n.args[3] for n in gm.graph.nodes if is_op(n, ops.attention)] == [D**-0.5]


def test_attention_non_causal_is_not_matched() -> None:
    no_mask = Fn(lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert rewrite(no_mask, _qkv(H), "match_attention")[1] == {"attention": 0}
    bidirectional = Fn(lambda self, *a: self.attn(*a), attn=Attention(_hf_sdpa, is_causal=False))
    assert rewrite(bidirectional, (*_qkv(), _causal()), "match_attention")[1] == {"attention": 0}


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attention_eager_hf(softcap) -> None:
    attn = Attention(_hf_eager, sliding_window=4)
    attn.softcap, attn.training = softcap, False
    module = Fn(lambda self, *a: self.attn(*a), attn=attn)
    q, k, v = (t * 3 for t in _qkv())
    gm, matched = rewrite(module, (q, k, v, _causal(4)), "match_attention")
    assert matched == {"attention": 1}
    (node,) = [n for n in gm.graph.nodes if is_op(n, ops.attention)]
    assert node.args[3:] == (pytest.approx(0.3), 4, softcap)
    assert _count(gm, (torch.ops.aten.softmax, torch.ops.aten.matmul, torch.ops.aten.dropout)) == 0


def test_attention_eager_divided_scale_without_repeat() -> None:
    module = Fn(lambda self, *a: self.attn(*a), attn=Attention(_eager_divided_no_repeat))
    gm, matched = rewrite(module, (*_qkv(H), _causal()), "match_attention")
    assert matched == {"attention": 1}
    assert [n.args[3] for n in gm.graph.nodes if is_op(n, ops.attention)] == [pytest.approx(D**-0.5)]


def _with_sinks(fn):
    """Attention(fn) holding GPT-OSS's per-head sink logits as a parameter."""
    attn = Attention(fn)
    attn.sinks, attn.training = nn.Parameter(torch.randn(H) * 2), False
    return Fn(lambda self, *a: self.attn(*a), attn=attn)


def _gpt_oss_eager(self, q, k, v, mask):
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return gpt_oss_attention(self, q, k, v, additive, scaling=0.3)[0].transpose(1, 2)


def _granite_swa_eager(self, q, k, v, mask):
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return granite_swa_attention(self, q, k, v, additive, scaling=0.3)[0].transpose(1, 2)


@pytest.mark.parametrize("form", [_gpt_oss_eager, _granite_swa_eager], ids=["gpt-oss", "granite-swa"])
def test_attention_sinks(form) -> None:
    """GPT-OSS's sink column (cat, row max, softmax, drop) and Granite SWA's logsumexp scale: the model's [H]
    parameter becomes the op's sinks, and nothing of either form is left."""
    module = _with_sinks(form)
    gm, matched = rewrite(module, (*_qkv(), _causal()), "match_attention")
    assert matched == {"attention": 1}
    (node,) = [n for n in gm.graph.nodes if is_op(n, ops.attention)]
    sinks = node.args[7]
    assert sinks.op == "get_attr" and sinks.target.endswith("sinks")
    assert _count(gm, (torch.ops.aten.cat, torch.ops.aten.logsumexp, torch.ops.aten.softmax)) == 0


def test_attention_sink_column_that_is_not_per_head_is_not_matched() -> None:
    """A last column that differs per query (not one logit per head) is no sink: left alone."""
    def per_query_column(self, q, k, v, mask):
        scores = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * 0.3 + torch.where(mask, 0.0, -1e9)
        probs = torch.cat([scores, scores[..., :1]], -1).softmax(-1)[..., :-1]
        return torch.matmul(probs, repeat_kv(v, 2))

    assert rewrite(Fn(lambda self, *a: self.attn(*a), attn=Attention(per_query_column)), (*_qkv(), _causal()),
                   "match_attention")[1] == {"attention": 0}


def test_attention_eager_without_mask_is_not_matched() -> None:
    def unmasked(self, q, k, v):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.3, dim=-1), v)

    assert rewrite(Fn(unmasked), _qkv(H), "match_attention")[1] == {"attention": 0}


# --- gated MLP and linear -----------------------------------------------------------------------


def _mlp_config(act: str) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act=act)


@pytest.mark.parametrize(
    "hf_act,activation", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"), ("relu", "relu")]
)
@pytest.mark.parametrize("mlp_cls", [LlamaMLP, Phi3MLP])
def test_gated_mlp(mlp_cls, hf_act: str, activation: str) -> None:
    config = _mlp_config(hf_act)
    module = Fn(lambda self, x: self.mlp(x), mlp=mlp_cls(config))
    gm, matched = rewrite(module, (torch.randn(B, S, 32),), "match_gated_mlp")
    assert matched == {"gated_mlp": 1}
    assert [n.args[2] for n in gm.graph.nodes if is_op(n, ops.gated_act)] == [activation]
    assert _count(gm, torch.ops.aten.linear) == 3 - (mlp_cls is Phi3MLP)  # projections stay linears


def test_gated_mlp_after_match_linear() -> None:
    module = Fn(lambda self, x: self.mlp(x), mlp=LlamaMLP(_CONFIG))
    matched = rewrite(module, (torch.randn(B, S, 32),), "match_linear", "match_gated_mlp")[1]
    assert matched == {"linear": 3, "gated_mlp": 1}


def test_activation_times_unrelated_tensor_is_not_matched() -> None:
    module = Fn(lambda self, x, y: F.silu(self.proj(x)) * y, proj=nn.Linear(32, 48))
    inputs = (torch.randn(B, S, 32), torch.randn(B, S, 48))
    assert rewrite(module, inputs, "match_gated_mlp")[1] == {"gated_mlp": 0}


def test_linear_with_and_without_bias() -> None:
    a, b = nn.Linear(32, 48, bias=True), nn.Linear(48, 16, bias=False)
    module = Fn(lambda self, x: self.b(self.a(x)), a=a, b=b)
    gm, matched = rewrite(module, (torch.randn(B, S, 32),), "match_linear")
    assert matched == {"linear": 2} and _count(gm, torch.ops.aten.linear) == 0
    biases = [n.args[2] for n in gm.graph.nodes if is_op(n, ops.linear)]
    assert biases[0] is not None and biases[1] is None


def _linears(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, ops.linear)]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_as_matmul_with_transposed_weight(bias: bool) -> None:
    """Falcon's FalconLinear: x @ self.weight.T (+ self.bias)."""
    module = Fn(lambda self, x: self.proj(x), proj=FalconLinear(32, 48, bias=bias))
    gm, matched = rewrite(module, (torch.randn(B, S, 32),), "match_linear")
    assert matched == {"linear": 1} and _count(gm, (aten.matmul, aten.numpy_T, aten.add)) == 0
    ((_, weight, b),) = [n.args for n in _linears(gm)]
    assert weight.op == "get_attr" and (b is not None) is bias


@pytest.mark.parametrize("shape", [(B, S, 32), (B * S, 32)], ids=["3d", "2d"])
def test_linear_as_addmm_with_in_out_weight(shape: tuple[int, ...]) -> None:
    """GPT-2's Conv1D: addmm(bias, x.view(-1, in), weight[in, out]).view(..., out)."""
    proj = Conv1D(48, 32)
    proj.bias.data = torch.randn(48)
    gm, matched = rewrite(Fn(lambda self, x: self.proj(x), proj=proj), (torch.randn(shape),), "match_linear")
    assert matched == {"linear": 1} and _count(gm, aten.addmm) == 0
    ((x, weight, b),) = [n.args for n in _linears(gm)]
    assert x.op == "placeholder"  # the linear takes x in its own shape: the 2-D view is gone
    assert is_op(weight, aten.t) and weight.args[0].op == "get_attr" and b.op == "get_attr"


def test_matmul_without_a_weight_parameter_is_not_matched() -> None:
    holder = nn.Module()
    holder.register_buffer("table", torch.randn(48, 32))
    module = Fn(lambda self, x, y: x @ y.T + x @ self.holder.table.T, holder=holder)
    inputs = (torch.randn(B, S, 32), torch.randn(48, 32))
    assert rewrite(module, inputs, "match_linear")[1] == {"linear": 0}
