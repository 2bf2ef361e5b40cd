"""Pattern transforms end to end on tiny random-weight HF models, against HF eager on the same weights.

Each config keeps its family's distinguishing features (llama3 rope scaling, sliding windows,
attention bias, q/k norms, soft caps and Gemma's norms, Phi-3's fused projections), because those are
what the matchers must see through.
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
}

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


def _count(gm, op) -> int:
    return sum(is_op(n, op) for m in graph_modules(gm) for n in m.graph.nodes)


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

    layers = config.num_hidden_layers
    assert matched["attention"] == layers
    assert matched["rope"] == 2 * layers
    assert matched["gated_mlp"] == layers
    assert matched == expected  # norms (incl. q/k and Gemma's four per layer) and linears, all found
    aten = torch.ops.aten
    leftovers = (aten.scaled_dot_product_attention, aten.softmax, aten._softmax, aten.rsqrt, aten.linear)
    assert _count(gm, leftovers) == 0

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
