"""End to end on the real embedded model: the optimized graph agrees with HF eager (float32, CPU)."""

import pytest

from autodeploy.agreement import compare, load_hf_reference
from autodeploy.loading import load_tokenizer
from autodeploy.optimizer import optimize_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a GPU is.",
    "Translate 'good morning' to Spanish.",
]


@pytest.fixture(scope="module")
def optimized(default_model_dir):
    return optimize_model(default_model_dir, overrides=["model.device=cpu", "model.dtype=float32"], progress=False)


def test_every_layer_is_matched(optimized):
    layers = optimized.source.config.num_hidden_layers
    matched = {r.name: r.matched for r in optimized.reports}
    assert matched["match_attention"]["attention"] == layers
    assert matched["match_rope"]["rope"] == 2 * layers
    assert matched["match_rms_norm"]["rms_norm"] == 2 * layers + 1
    assert matched["match_gated_mlp"]["gated_mlp"] == layers
    assert all(not r.warnings for r in optimized.reports)


def test_greedy_tokens_and_logits_match_hf_eager(optimized):
    tokenizer = load_tokenizer(optimized.source)
    hf = load_hf_reference(optimized)
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        result = compare(optimized, hf, ids, max_new_tokens=32)
        assert result.tokens_equal, (prompt, result.hf_tokens, result.ours_tokens)
        assert result.max_rel_logit_diff < 1e-3, (prompt, result.max_rel_logit_diff)
