"""Tensor parallelism: the sharding transform, sharded loading, and LLM over N gloo ranks on the CPU.

References: the same model at tensor_parallel_size 1 (greedy tokens identical, logits close); each
rank's graph is checked against the slices the transform says it loads.
"""

import os
import time

import pytest
import torch
from safetensors.torch import save_file
from safetensors import safe_open

from autodeploy.errors import ShardingError, WorkerError
from autodeploy.llm import LLM, SamplingParams
from autodeploy.optimizer import optimize_model
from autodeploy.parallel.channel import decode, encode
from autodeploy.parallel.slices import ShardSlice, shards_of
from autodeploy.runtime.batch import Chunk

NO_CACHE = ["transforms.insert_kv_cache.enabled=false", "transforms.fuse_shared_input_linears.enabled=false",
            "model.device=cpu", "model.dtype=float32"]
RUNTIME = dict(max_batch_size=4, max_num_tokens=64, **{"transforms.insert_kv_cache.num_blocks": 32,
                                                        "export.max_seq_len": 128, "export.max_batch_size": 4})
PROMPTS = [[1, 5, 9, 200, 31, 7, 99], [4, 8, 15, 16, 23, 42], [250, 3]]


def _sharded(path, rank: int, world: int):
    return optimize_model(path, overrides=NO_CACHE + [f"parallel.tensor_parallel_size={world}",
                                                      f"parallel.rank={rank}"], progress=False)


def _report(model, name="shard_tensor_parallel"):
    return next(r for r in model.reports if r.name == name)


def test_all_reduce_is_identity_without_a_group():
    x = torch.randn(3, 5)
    y = torch.ops.autodeploy.all_reduce(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def test_a_second_shutdown_leaves_a_newer_process_group_alone(tmp_path):
    from autodeploy.parallel.channel import StepChannel
    from autodeploy.parallel.ranks import Ranks

    ranks = Ranks(StepChannel(None), [])
    ranks.shutdown()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ranks.shutdown()  # LLM.shutdown() ran first; now the finalizer
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_slice_reads_only_the_ranges_and_matches_take(tmp_path):
    full = torch.randn(7, 11)
    save_file({"w": full}, tmp_path / "w.safetensors")
    spec = ShardSlice(dim=1, ranges=((1, 3), (6, 9)))
    with safe_open(tmp_path / "w.safetensors", framework="pt") as handle:
        got = spec.read(handle, "w")
    assert torch.equal(got, torch.cat([full[:, 1:3], full[:, 6:9]], dim=1))
    assert torch.equal(spec.take(full), got) and spec.local_shape(full.shape) == (7, 5)


def test_step_chunks_survive_the_channel_encoding():
    chunks = [Chunk([5, 6, 7], 0, [3, 1]), Chunk([-1], 9, [2], feed_row=4), Chunk([8, 9], 0, [0], [0, 1])]
    assert decode(encode(chunks), len(chunks)) == chunks


def test_each_rank_holds_its_slices_of_a_gqa_model(tiny_llama_dir):
    full = optimize_model(tiny_llama_dir, overrides=NO_CACHE, progress=False)
    params = dict(full.gm.named_parameters())
    for rank in range(2):
        shard = _sharded(tiny_llama_dir, rank, 2)
        matched = _report(shard).matched
        assert matched["column"] == 2 * 5 and matched["row"] == 2 * 2 and matched["all_reduce"] == 4
        assert matched["heads_per_rank"] == 2 and matched["kv_heads_per_rank"] == 1
        assert matched["tp_plan_agree"] == 2 * 7 and matched["tp_plan_disagree"] == 0  # LlamaConfig's plan
        local = dict(shard.gm.named_parameters())
        for name, spec in shards_of(shard.gm).items():
            assert torch.equal(local["model." + name], spec.take(params["model." + name])), name
        q = local["model.model.layers.0.self_attn.q_proj.weight"]
        o = local["model.model.layers.0.self_attn.o_proj.weight"]
        assert q.shape == (32, 64) and o.shape == (64, 32)
        assert torch.equal(q, params["model.model.layers.0.self_attn.q_proj.weight"][32 * rank:32 * (rank + 1)])
        linear_bytes = sum(p.numel() for n, p in local.items() if "proj" in n)
        assert linear_bytes * 2 == sum(p.numel() for n, p in params.items() if "proj" in n)


def test_kv_heads_are_replicated_when_ranks_outnumber_them(tiny_llama_dir):
    """4 query heads over 2 KV heads at TP 4: each rank keeps the one KV head its query head needs."""
    full = dict(optimize_model(tiny_llama_dir, overrides=NO_CACHE, progress=False).gm.named_parameters())
    shard = _sharded(tiny_llama_dir, 3, 4)
    assert _report(shard).matched["kv_heads_per_rank"] == 1
    k = dict(shard.gm.named_parameters())["model.model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(k, full["model.model.layers.1.self_attn.k_proj.weight"][16:32])  # KV head 1 of 2


def test_hf_tp_plan_disagreements_name_the_linear_and_both_styles():
    from autodeploy.parallel.tp_plan import compare_with_plan

    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise_split_input",
            "layers.*.mlp.experts": "moe_tp_experts", "layers.*.mlp.down_proj": "rowwise"}
    linears = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
               "model.layers.0.mlp.router", "lm_head"]
    ours = {"model.layers.0.self_attn.q_proj": "colwise", "model.layers.0.self_attn.o_proj": "rowwise"}
    assert compare_with_plan(plan, linears, ours) == (2, ["model.layers.0.mlp.down_proj: HF rowwise, ours replicated"])
    assert compare_with_plan(None, linears, ours) == (0, [])


def test_a_head_count_that_does_not_divide_names_the_sizes_that_work(default_model_dir):
    with pytest.raises(ShardingError, match=r"9 query heads, 3 key/value heads\); sizes that work: 1, 3, 9"):
        LLM(default_model_dir, tensor_parallel_size=2)


def test_unknown_rank_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ShardingError, match="parallel.rank 2 is not a rank"):
        _sharded(tiny_llama_dir, 2, 2)


@pytest.fixture(scope="module")
def tp1_tokens(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, **RUNTIME)
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))]


def test_vocab_parallel_splits_embedding_and_lm_head_rows(tiny_llama_dir):
    """Rank 1 of 2 holds vocabulary rows 128..255 of both tables; lookups outside them are masked and
    summed over ranks, the logits gathered (auto keeps both replicated)."""
    full = dict(optimize_model(tiny_llama_dir, overrides=NO_CACHE, progress=False).gm.named_parameters())
    shard = optimize_model(tiny_llama_dir, overrides=NO_CACHE + [
        "parallel.tensor_parallel_size=2", "parallel.rank=1", "parallel.vocab_parallel=true"], progress=False)
    local = dict(shard.gm.named_parameters())
    for name in ("model.model.embed_tokens.weight", "model.lm_head.weight"):
        assert torch.equal(local[name], full[name][128:256]), name
    assert _report(shard).matched["vocab_parallel"] == 2 and _report(shard).matched["all_reduce"] == 5
    gathers = [n for n in shard.gm.graph.nodes if n.target == torch.ops.autodeploy.all_gather.default]
    assert len(gathers) == 1 and gathers[0].args[1:] == (-1, 2)
    assert "vocab_parallel" not in _report(_sharded(tiny_llama_dir, 1, 2)).matched
    with pytest.raises(ShardingError, match="vocab_parallel must be auto, true or false, not 'maybe'"):
        optimize_model(tiny_llama_dir, overrides=NO_CACHE + ["parallel.tensor_parallel_size=2",
                                                             "parallel.vocab_parallel=maybe"], progress=False)


def test_llm_over_two_gloo_ranks_matches_one_then_survives_a_killed_worker(tiny_llama_dir, tp1_tokens):
    """Vocab-parallel embedding and LM head here (the zoo tests run them replicated); each rank's head projects
    only the sampled rows, through the logits' all_gather."""
    llm = LLM(tiny_llama_dir, overrides=["parallel.vocab_parallel=true"], tensor_parallel_size=2, **RUNTIME)
    try:
        assert _report(llm.model).matched["vocab_parallel"] == 2
        assert _report(llm.model, "gather_lm_head_rows").matched == {"gathered_lm_head": 1}
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
        assert [o.token_ids for o in outs] == tp1_tokens
        worker = llm._ranks.processes[0]
        os.kill(worker.pid, 9)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="worker rank 1 exited"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
        assert time.monotonic() - start < 60
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in llm._ranks.processes)


def test_quantized_checkpoint_tensors_follow_their_weights_slice(tmp_path):
    """compressed-tensors W4A16 g32 ([N, K/8] int32 codes, [N, K/32] scales) at TP 2, rank 1: q_proj
    keeps the second half of rows, o_proj the second half of K (codes and group scales alike)."""
    from transformers import LlamaConfig

    from quant_fixtures import write_compressed_tensors

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    write_compressed_tensors(tmp_path, config, "W4A16", group_size=32)
    overrides = ["model.device=cpu", "model.dtype=float32", "transforms.insert_kv_cache.enabled=false",
                 "transforms.fuse_shared_input_linears.enabled=false"]  # q_proj's own tensors, not the fused q/k/v
    full = dict(optimize_model(tmp_path, overrides=overrides, progress=False).gm.named_parameters())
    local = dict(optimize_model(tmp_path, overrides=overrides + ["parallel.tensor_parallel_size=2",
                                                                 "parallel.rank=1"], progress=False).gm.named_parameters())
    attn = "model.model.layers.0.self_attn."
    codes = [name for name in local if name.startswith(attn + "q_proj.")]
    assert sorted(codes) == [attn + "q_proj.qweight", attn + "q_proj.scales"], codes
    for name in (attn + "q_proj.qweight", attn + "q_proj.scales"):
        assert torch.equal(local[name], full[name][full[name].shape[0] // 2:]), name
    for name in (attn + "o_proj.qweight", attn + "o_proj.scales"):
        assert torch.equal(local[name], full[name][:, full[name].shape[1] // 2:]), name
    assert local[attn + "o_proj.scales"].shape == (64, 1)  # 32 of 64 columns: one group of 32


@pytest.mark.slow
def test_online_int4_llama_at_tp2_matches_tp1(tiny_llama_dir):
    """Online int4 g32: every group lies inside one shard, so each rank's codes and scales are TP 1's."""
    quantization = ["quantization.algo=int4", "quantization.group_size=32"]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = [o.token_ids for o in LLM(tiny_llama_dir, overrides=quantization, **RUNTIME).generate(PROMPTS, params)]
    llm = LLM(tiny_llama_dir, overrides=quantization, tensor_parallel_size=2, **RUNTIME)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_online_fp8_blocks_at_tp2_give_tp1_tokens(tiny_llama_dir):
    """FP8 weight blocks of 16 and activation groups as wide: every shard boundary falls on a block, so each rank's
    weight blocks and its slice of each token's activation groups are TP 1's."""
    quantization = ["quantization.algo=fp8", "quantization.weight_block_size=16", "quantization.act_group_size=16"]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    one = LLM(tiny_llama_dir, overrides=quantization, **RUNTIME)
    want = [o.token_ids for o in one.generate(PROMPTS, params)]
    scales = dict(one.model.gm.named_parameters())
    llm = LLM(tiny_llama_dir, overrides=quantization, tensor_parallel_size=2, **RUNTIME)
    try:
        local = dict(llm.model.gm.named_parameters())
        name = "model.model.layers.0.mlp.down_proj.weight_scale"  # row-parallel: rank 0's K blocks
        assert local[name].shape == (4, 4) and torch.equal(local[name], scales[name][:, :4])
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_online_fp8_llama_at_tp2_stays_within_fp8_error(tiny_llama_dir):
    """Online fp8 weight scales are the whole rows' (a row-parallel shard's amax and scale-search errors
    are combined over the ranks at load): rank 0's o_proj / down_proj scales are TP 1's. Activation
    scales (per token) still cover each rank's K slice, so logits differ from TP 1's fp8 by less than
    fp8 differs from float32."""
    ids = torch.tensor([PROMPTS[0]])
    positions = torch.arange(ids.shape[1])[None]
    exact = LLM(tiny_llama_dir, **RUNTIME).model.logits(ids)
    one = LLM(tiny_llama_dir, overrides=["quantization.algo=fp8"], **RUNTIME)
    fp8, scales = one.model.logits(ids), dict(one.model.gm.named_parameters())
    llm = LLM(tiny_llama_dir, overrides=["quantization.algo=fp8"], tensor_parallel_size=2, **RUNTIME)
    try:
        assert _report(llm.model, "quantize_linear").matched["fp8_linear"] == 2 * 7
        row_parallel = [n for n in scales if n.endswith(("o_proj.weight_scale", "down_proj.weight_scale"))]
        assert len(row_parallel) == 4
        local = dict(llm.model.gm.named_parameters())
        for name in row_parallel:
            assert torch.equal(local[name], scales[name]), name
        sharded = llm.engine.executor.full_logits(ids, positions)
        assert 0 < (sharded - fp8).abs().max() < (fp8 - exact).abs().max()
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_online_fp8_experts_split_inside_keep_tp1_down_scales(tmp_path):
    """TP inside experts: each rank's K slice of every expert's down weight gets the whole rows' fp8 scales."""
    entry = _zoo_checkpoint("qwen3-moe", tmp_path)
    overrides = [f"model.attn_implementation={entry.attn_implementation}", *entry.overrides, "quantization.algo=fp8"]
    one = LLM(tmp_path, str(entry.recipe), overrides=overrides)
    scales = {n: p for n, p in one.model.gm.named_parameters() if n.endswith("experts.down_proj_scale")}
    assert len(scales) == 2, list(scales)
    llm = LLM(tmp_path, str(entry.recipe), overrides=overrides, tensor_parallel_size=2)
    try:
        assert _report(llm.model).matched["experts_per_rank"] > 1  # every expert, a slice of each
        local = dict(llm.model.gm.named_parameters())
        for name, scale in scales.items():
            assert torch.equal(local[name], scale), name
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_smollm2_tp3_matches_tp1(default_model_dir):
    """Real weights, 9 query / 3 KV heads over 3 ranks: tokens identical, logits within 1e-4 relative."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
               "Water boils at"]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    one = LLM(default_model_dir)
    want_tokens = [o.token_ids for o in one.generate(prompts, params)]
    want_logits = one.model.logits(ids)
    del one
    three = LLM(default_model_dir, tensor_parallel_size=3)
    try:
        assert [o.token_ids for o in three.generate(prompts, params)] == want_tokens
        got = three.engine.executor.full_logits(ids, torch.arange(ids.shape[1])[None])
        assert ((got - want_logits).abs().max() / want_logits.abs().max()).item() < 1e-4
    finally:
        three.shutdown()


def _zoo_checkpoint(name: str, folder, **config):
    """A zoo entry (its tiny config, `config` on top) saved to `folder`; returns the entry."""
    from dataclasses import replace

    from autodeploy.model_zoo_ci.runner import build_checkpoint
    from autodeploy.model_zoo_ci.zoo import load_zoo

    entry = next(e for e in load_zoo() if e.name == name)
    entry = replace(entry, config={**entry.config, **config})
    build_checkpoint(entry, folder)
    return entry


def _assert_slices_of_checkpoint(shard, folder, within: str) -> int:
    """Every sharded parameter named `within`... holds exactly its recorded slice of the checkpoint
    tensor; returns how many were checked."""
    from autodeploy.parallel.slices import checkpoint_name

    local, shards = dict(shard.gm.named_parameters()), shards_of(shard.gm)
    checked = [name for name in shards if within in name]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name in checked:
            want = shards[name].take(f.get_tensor(checkpoint_name(name, shards)))
            assert torch.equal(local["model." + name], want), name
    return len(checked)


def test_mla_attention_is_split_by_heads(tmp_path):
    """DeepSeek-V3 MLA: q_b / kv_b column-parallel per head, o_proj row-parallel; the low-rank q_a /
    kv_a and their norms replicated (counted, no warning); the filled key becomes a cat."""
    entry = _zoo_checkpoint("deepseek-v3", tmp_path)
    shard = optimize_model(tmp_path, str(entry.recipe), overrides=NO_CACHE + [
        "parallel.tensor_parallel_size=2", "parallel.rank=1", "parallel.enable_expert_parallel=true"], progress=False)
    report = _report(shard)
    assert not report.warnings, report.warnings
    matched = report.matched
    assert matched["attention"] == 2 and matched["filled_to_cat"] == 2 and matched["replicated_low_rank"] == 4
    assert matched["experts_per_rank"] == 16
    params = dict(shard.gm.named_parameters())
    assert params["model.model.layers.0.self_attn.kv_b_proj.weight"].shape == (2 * 64, 32)  # 2 of 4 heads
    assert params["model.model.layers.0.self_attn.q_a_proj.weight"].shape == (96, 128)  # replicated
    assert _assert_slices_of_checkpoint(shard, tmp_path, "self_attn") == 2 * 3  # q_b, kv_b, o_proj


@pytest.mark.slow
@pytest.mark.parametrize("name, extra, config", [
    ("llama-3.1", [], {}), ("qwen3", [], {}), ("gemma-2", [], {}), ("mixtral", [], {}), ("phi-3", [], {}),
    ("gpt2", [], {}), ("qwen3-moe", ["parallel.enable_expert_parallel=true"], {}),
    ("deepseek-v3", ["parallel.enable_expert_parallel=true"], {}), ("deepseek-v2-lite", [], {}), ("falcon", [], {}),
    ("falcon", [], {"new_decoder_architecture": True, "multi_query": False, "num_kv_heads": 2}),
    ("llama-3.2-tied", ["parallel.vocab_parallel=true"], {}), ("gemma-2", ["parallel.vocab_parallel=true"], {}),
    ("bloom", [], {}),
    ("qwen3-moe", ["parallel.enable_expert_parallel=true", "quantization.algo=int4", "quantization.group_size=32"], {}),
])
def test_zoo_models_at_tp2_match_tp1(tmp_path, name, extra, config):
    """Tiny zoo configs: GQA, q/k norm, soft-capping + sliding window, MoE (TP inside experts, expert
    parallel), fused qkv / gate_up in the checkpoint (Phi-3), Conv1D with fused c_attn (GPT-2), MLA
    (DeepSeek), Falcon's fused query_key_value (multi-query, and grouped in the new decoder layout), ALiBi
    slopes per rank (Bloom), vocab-parallel embedding and LM head (tied: Llama 3.2; soft-capped: Gemma 2),
    online int4 experts split by expert.
    Every attention is sharded (no region left replicated)."""
    entry = _zoo_checkpoint(name, tmp_path, **config)
    overrides = [f"model.attn_implementation={entry.attn_implementation}", *entry.overrides, *extra]
    params = SamplingParams(max_tokens=entry.max_new_tokens, temperature=0.0)
    want = LLM(tmp_path, str(entry.recipe), overrides=overrides).generate([list(entry.prompt)], params)[0].token_ids
    llm = LLM(tmp_path, str(entry.recipe), overrides=overrides, tensor_parallel_size=2)
    try:
        report = _report(llm.model)
        assert not [w for w in report.warnings if "stays replicated" in w], report.warnings
        assert report.matched["attention"] == entry.expect["match_attention"]["attention"]
        assert llm.generate([list(entry.prompt)], params)[0].token_ids == want
    finally:
        llm.shutdown()
