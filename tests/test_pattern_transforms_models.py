"""Pattern transforms end to end on tiny random-weight HF models, against HF eager on the same weights.

Each config keeps its family's distinguishing features (llama3 rope scaling, sliding windows,
attention bias, q/k norms, soft caps and Gemma's norms, Phi-3's fused projections, GPT-2's Conv1D and
Falcon's matmul linears, DeepSeek-V2's complex-number rope with yarn scaling), because those are what
the matchers must see through.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from autodeploy.export import export_causal_lm
from autodeploy.graph_utils import finalize, graph_modules, is_op
from autodeploy.transforms import TRANSFORMS, TransformContext

PATTERN_TRANSFORMS = ["match_attention", "match_rope", "match_rms_norm", "match_gated_mlp", "match_linear"]
SEQ_LEN = 13
_SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)

CONFIGS = {
    "llama3": lambda: transformers.LlamaConfig(
        **_SMALL,
        rope_scaling={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**_SMALL, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL),  # q/k/v projections with bias
    "qwen3": lambda: transformers.Qwen3Config(**_SMALL, head_dim=32),  # q_norm / k_norm
    "gemma2": lambda: transformers.Gemma2Config(
        **_SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
        initializer_range=0.3,  # scores of order 1 and more, so the soft cap matters
    ),
    "phi3": lambda: transformers.Phi3Config(
        **{**_SMALL, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1, eos_token_id=2
    ),
    "gpt2": lambda: transformers.GPT2Config(  # Conv1D projections: addmm with [in, out] weights
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, activation_function="gelu_new",
    ),
    "falcon": lambda: transformers.FalconConfig(  # FalconLinear: x @ W.T + b
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, bias=True, alibi=False, new_decoder_architecture=False, max_position_embeddings=256,
    ),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(  # MLA, complex rope, MoE with a shared expert
        **{**_SMALL, "num_key_value_heads": 4}, moe_intermediate_size=32, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        topk_method="greedy", rope_scaling={  # mscale != mscale_all_dim: freqs_cis has magnitude 1.04, not 1
            "type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32,
            "beta_slow": 1, "original_max_position_embeddings": 64,
        },
    ),
}

# Canonical ops per layer: Llama-shaped families have all three; the others say what they have.
_LLAMA_LAYER = {"attention": 1, "rope": 2, "gated_mlp": 1}
PER_LAYER = {"gpt2": {"attention": 1}, "falcon": {"attention": 1, "rope": 2}}
# Linears computed with F.linear outside any nn.Linear module, which match_linear's expected() counts.
UNCOUNTED_LINEARS = {"deepseek_v2": 1}  # the MoE router of the one MoE layer

# (family, attn_implementation); Gemma 2 refuses sdpa at construction, see `_build`.
CASES = [(f, "sdpa") for f in CONFIGS] + [("llama3", "eager"), ("gemma2", "eager"), ("phi3", "eager")]


def _build(family: str, attn_implementation: str) -> tuple[torch.nn.Module, transformers.PretrainedConfig]:
    torch.manual_seed(0)
    config = CONFIGS[family]()
    if attn_implementation == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        config.attn_logit_softcapping = None  # transformers' sdpa path raises on a soft cap
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Set after construction: Gemma 2 declares no sdpa support (sdpa cannot soft-cap) but runs it.
    model.config._attn_implementation = attn_implementation
    return model, config


def _eager_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False).logits
    finally:
        model.config._attn_implementation = implementation


_ATEN = torch.ops.aten
# What the pattern transforms replace; any of these left means a layer was missed.
LEFTOVER_OPS = (
    _ATEN.scaled_dot_product_attention, _ATEN.softmax, _ATEN._softmax, _ATEN.rsqrt, _ATEN.linear,
    _ATEN.matmul, _ATEN.mm, _ATEN.addmm, _ATEN.view_as_complex,
)


def _in_router_or_rotary(node: torch.fx.Node) -> bool:
    """Traced inside a MoE router (its softmax is routing, not attention) or a rotary embedding (its
    matmul computes the frequencies; transformers 5.17 traces it outside the no-grad submodule)."""
    classes = [str(cls) for _, cls in node.meta.get("nn_module_stack", {}).values()]
    return any(c.endswith("Router") or "RotaryEmbedding" in c for c in classes)


def _leftovers(gm) -> list[str]:
    return [n.name for m in graph_modules(gm) for n in m.graph.nodes
            if is_op(n, LEFTOVER_OPS) and not _in_router_or_rotary(n)]


def _export_and_match(model, config) -> tuple[torch.fx.GraphModule, dict[str, int], dict[str, int]]:
    """Export, run the pattern transforms in recipe order; return the graph, matched and expected."""
    gm = export_causal_lm(model)
    dtype = next(model.parameters()).dtype
    ctx = TransformContext(SimpleNamespace(config=config), model, torch.device("cpu"), dtype)
    matched, expected = {}, {}
    for name in PATTERN_TRANSFORMS:
        transform = TRANSFORMS[name]()
        matched.update(transform.apply(gm, ctx))
        finalize(gm)
        expected.update(transform.expected(gm, ctx))
    return gm, matched, expected


def _logits(gm, model, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformed graph, HF eager) logits on the same random input_ids, batch 2."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (2, SEQ_LEN))
    position_ids = torch.arange(SEQ_LEN).expand(2, SEQ_LEN)
    with torch.no_grad():
        got = gm(input_ids, position_ids)
    return got.float(), _eager_logits(model, input_ids).float()


@pytest.mark.parametrize("family,attn_implementation", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_pattern_transforms_match_hf_eager(family: str, attn_implementation: str) -> None:
    model, config = _build(family, attn_implementation)
    gm, matched, expected = _export_and_match(model, config)

    per_layer = PER_LAYER.get(family, _LLAMA_LAYER)
    for kind in _LLAMA_LAYER:
        assert matched[kind] == per_layer.get(kind, 0) * config.num_hidden_layers, kind
    # norms (incl. q/k and Gemma's four per layer) and linears (Conv1D and FalconLinear too), all found
    expected["linear"] += UNCOUNTED_LINEARS.get(family, 0)
    assert {kind: matched[kind] for kind in expected} == expected
    assert _leftovers(gm) == []

    got, want = _logits(gm, model, config)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("family,attn_implementation", [("llama3", "sdpa"), ("gemma2", "eager")])
def test_pattern_transforms_match_bf16_exports(family: str, attn_implementation: str) -> None:
    """bf16 graphs carry different casts around norms and rope; the matchers must see through them."""
    model, config = _build(family, attn_implementation)
    model.to(torch.bfloat16)
    gm, matched, expected = _export_and_match(model, config)
    assert matched == expected
    got, want = _logits(gm, model, config)
    # The canonical attention computes in fp32 where HF eager rounds scores to bf16.
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())
