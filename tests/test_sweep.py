"""The wide-net sweep (`autodeploy zoo --all-architectures`): which types it takes by rule, the tiny
configs it derives, and a sample of types end to end against HF eager (the whole sweep is slow)."""

import pytest
from transformers import CONFIG_MAPPING

from autodeploy.model_zoo_ci.sweep import hf_runs, run_sweep, select_types, sweep_entry, sweep_markdown, tiny_config_fields


def test_types_are_selected_by_rule():
    selection = select_types()
    assert {"llama", "bloom", "mpt", "mamba", "jamba", "qwen3_next"} <= set(selection.types)
    assert selection.excluded["bart"] == "encoder-decoder"
    assert selection.excluded["bert"] == "encoder (has a masked-LM head)"
    assert selection.excluded["gemma3"] == "multimodal (composite config)"
    assert not set(selection.types) & set(selection.excluded)


def test_tiny_config_keeps_the_layer_pattern():
    fields = tiny_config_fields("gemma2")  # alternating sliding / full attention
    assert (fields["hidden_size"], fields["num_hidden_layers"], fields["vocab_size"]) == (64, 2, 512)
    assert set(fields["layer_types"]) == set(CONFIG_MAPPING["gemma2"]().layer_types)
    fields = tiny_config_fields("mixtral")
    assert (fields["num_local_experts"], fields["num_experts_per_tok"]) == (4, 2)
    model_type = fields.pop("model_type")
    CONFIG_MAPPING[model_type](**fields)  # a valid config


@pytest.mark.parametrize("model_type", ["gptj", "deepseek_v3", "mamba2", "ministral", "inkling2_text"])
def test_derived_sizes_are_consistent_for_hf(model_type):
    """Sizes the defaults tie to others (rotary_dim, MLA head dims, Mamba-2 heads, head_dim None, unpadded
    vocab) follow the tiny ones: HF builds and runs each tiny config, so the type is counted."""
    fields = tiny_config_fields(model_type)
    assert fields.get("rotary_dim", 8) <= 16 and fields.get("unpadded_vocab_size", 512) <= fields["vocab_size"]
    if "qk_rope_head_dim" in fields:
        assert fields["head_dim"] == fields["qk_rope_head_dim"]
    if "expand" in fields:
        assert fields["num_heads"] * fields["head_dim"] == fields["hidden_size"] * fields["expand"]
    assert hf_runs(sweep_entry(model_type)) == ""


@pytest.mark.parametrize("model_type", ["qwen2", "bloom", "gpt_neox", "gpt_neo", "mamba", "xglm", "granitemoe_swa"])
def test_sample_of_the_sweep_matches_hf(model_type):
    (result,) = run_sweep([model_type])
    assert result.hf_unsupported == ""
    assert result.entry.passed, result.entry.first_failure()
    assert result.entry.tokens_equal
    assert sweep_markdown([result]).startswith("1/1 text causal-LM types pass")


def test_gpt_neo_local_layers_take_their_window_from_the_mask_buffer():
    """GPT-Neo masks scores with where(bias, scores, min), its local layers' `bias` a causal band of window_size
    keys: match_attention reads the window from that buffer. With a window of 3 under an 8-token prompt the
    local layer sees fewer keys than a causal one would (without the window: logits 0.29 of the max apart)."""
    import dataclasses

    from autodeploy.model_zoo_ci.runner import run_entry

    entry = sweep_entry("gpt_neo")
    entry = dataclasses.replace(entry, config={**entry.config, "window_size": 3}, max_new_tokens=8)
    result = run_entry(entry)
    assert result.passed, result.first_failure()
    assert result.matched["match_attention"] == {"attention": 2} and result.max_rel_logit_diff < 1e-5


def test_nodes_added_next_to_placeholders_named_outside_the_namespace_get_names_of_their_own():
    """HRM's nested loop bodies hold placeholders (`getitem_9`) their graph's namespace never issued, so a node a
    transform adds can come out with the same name: finalize renames it (lint refused the graph before)."""
    import operator

    import torch
    from torch.fx import Graph, GraphModule

    from autodeploy.graph_utils import finalize

    graph = Graph()
    x = graph.placeholder("x")
    x.name = "getitem"  # named outside the namespace
    first = graph.call_function(operator.getitem, (x, 0))
    graph.output(first)
    gm = GraphModule(torch.nn.Module(), graph)
    assert first.name == "getitem"
    finalize(gm)
    assert len({n.name for n in gm.graph.nodes}) == 3 and gm(torch.tensor([5, 6])) == 5


def test_a_type_past_the_memory_limit_fails_alone(monkeypatch):
    """A type whose HF model takes more memory than `memory_limit` allows (blt's tiny config: over 18 GB in HF's
    forward) is reported as one HF cannot run, and the next type still runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from autodeploy.model_zoo_ci import sweep

    build = AutoModelForCausalLM.from_config

    def greedy(config, **kwargs):
        if config.model_type == "qwen2":
            torch.empty(2 * 2**30, dtype=torch.uint8)  # 2 GB: past a 1 GB limit
        return build(config, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", greedy)
    monkeypatch.setattr(sweep, "run_entry", lambda entry: None)
    first, second = run_sweep(["qwen2", "llama"], memory_limit=1.0)
    assert "allocate memory" in first.hf_unsupported and second.hf_unsupported == ""


def test_an_attention_left_as_hf_wrote_it_refuses_a_cache():
    """inkling_text's attentions add a learned relative bias (left unmatched) beside state-space layers that get
    state slots: with any cache each step would give those attentions only its own tokens, so the cache stage
    fails with the reason instead of generating wrong tokens."""
    (result,) = run_sweep(["inkling_text"])
    stage, detail = result.entry.first_failure()
    assert stage == "cache" and "learned bias" in detail.detail
