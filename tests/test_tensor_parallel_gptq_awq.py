"""GPTQ (with and without act-order), AWQ and fine-grained (block) FP8 checkpoints at tensor_parallel_size 2.

References: the same checkpoint at TP 1 (each rank's canonical tensors are TP 1's, sliced; greedy
tokens identical and logits within float32 noise over two gloo ranks). The Triton kernels on a
row-parallel act-order slice: tests/test_quant_triton.py. Checkpoints come from tests/quant_fixtures.py, which
packs the published layouts independently of autodeploy's converters.
"""

import pytest
import torch
from transformers import LlamaConfig, Phi3Config

from autodeploy.errors import QuantizationError
from autodeploy.llm import LLM, SamplingParams
from autodeploy.optimizer import optimize_model
from conftest import save_tiny_checkpoint
from quant_fixtures import write_awq, write_fine_grained_fp8, write_gptq

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
NO_CACHE = ["model.device=cpu", "model.dtype=float32", "transforms.insert_kv_cache.enabled=false",
            "transforms.fuse_shared_input_linears.enabled=false"]  # each linear's own tensors, not fused q/k/v
RUNTIME = dict(max_batch_size=4, max_num_tokens=64, **{"transforms.insert_kv_cache.num_blocks": 32,
                                                        "export.max_seq_len": 128, "export.max_batch_size": 4})
PROMPTS = [[1, 5, 9, 200, 31, 7, 99], [4, 8, 15, 16, 23, 42], [250, 3]]
ATTN = "model.model.layers.0.self_attn."
MLP = "model.model.layers.0.mlp."


def _write(path, kind: str, config=None):
    config = config or LlamaConfig(**CONFIG)
    if kind == "online_int4":
        return save_tiny_checkpoint(path, config)
    if kind == "awq":
        return write_awq(path, config, group_size=16)
    if kind == "fine_grained_fp8":
        return write_fine_grained_fp8(path, config, block=16)
    return write_gptq(path, config, group_size=16, act_order=kind == "gptq_act_order", symmetric=kind == "gptq")


def _params(path, world: int = 1, rank: int = 0) -> dict[str, torch.Tensor]:
    sharded = [f"parallel.tensor_parallel_size={world}", f"parallel.rank={rank}"]
    return dict(optimize_model(path, overrides=NO_CACHE + sharded, progress=False).gm.named_parameters())


class _ReadSpy:
    """A safetensors handle that records which tensors are read whole (get_tensor), not sliced."""

    def __init__(self, handle, whole: list[str]):
        self.handle, self.whole = handle, whole

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def get_tensor(self, key: str):
        self.whole.append(key)
        return self.handle.get_tensor(key)


@pytest.mark.parametrize("kind", ["gptq", "gptq_act_order", "awq"])
def test_each_rank_holds_tp1_tensors_sliced(tmp_path, kind, monkeypatch):
    """Rank 1 of 2: column-parallel q_proj / gate_proj keep the second half of their rows (codes, scales,
    zeros); row-parallel o_proj / down_proj the second half of K: codes, and without act-order the
    group scales / zeros; with act-order g_idx is sliced with K and every group (global) stays. The
    rank reads sliced tensors through safetensors slices: whole only what it keeps whole."""
    import safetensors

    _write(tmp_path, kind, LlamaConfig(**{**CONFIG, "num_hidden_layers": 1}))
    full = _params(tmp_path)
    whole, safe_open = [], safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _ReadSpy(safe_open(*a, **k), whole))
    local = _params(tmp_path, 2, 1)
    assert "model.norm.weight" in whole  # replicated tensors are read whole (the spy sees the reads)
    quantized = [k for k in whole if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    if kind == "gptq_act_order":  # every group's scales / zeros of the row-parallel layers; g_idx of column ones
        row = [f"{layer}.{name}" for layer in ("self_attn.o_proj", "mlp.down_proj") for name in ("qzeros", "scales")]
        column = [f"{layer}.g_idx" for layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "mlp.gate_proj", "mlp.up_proj")]
        assert sorted(quantized) == sorted(f"model.layers.0.{name}" for name in row + column)
    else:
        assert quantized == []
    kinds = ("qweight", "scales", "zeros") + (("g_idx",) if kind == "gptq_act_order" else ())
    assert sorted(n for n in local if n.startswith(ATTN + "o_proj.")) == sorted(ATTN + "o_proj." + k for k in kinds)
    for layer in (ATTN + "q_proj", MLP + "gate_proj"):
        for name in kinds[:3]:
            whole = full[f"{layer}.{name}"]
            assert torch.equal(local[f"{layer}.{name}"], whole[whole.shape[0] // 2:]), (layer, name)
        if kind == "gptq_act_order":
            assert torch.equal(local[f"{layer}.g_idx"], full[f"{layer}.g_idx"])
    for layer in (ATTN + "o_proj", MLP + "down_proj"):
        sliced = ("qweight", "g_idx") if kind == "gptq_act_order" else ("qweight", "scales", "zeros")
        for name in kinds:
            whole = full[f"{layer}.{name}"]
            want = whole[..., whole.shape[-1] // 2:] if name in sliced else whole
            assert torch.equal(local[f"{layer}.{name}"], want), (layer, name)
    if kind == "gptq_act_order":  # the point of keeping every group: this rank's columns use groups of both halves
        g_idx = local[ATTN + "o_proj.g_idx"]
        assert g_idx.min() < 2 and g_idx.max() >= 2 and local[ATTN + "o_proj.scales"].shape == (64, 4)


def test_a_row_slice_inside_a_group_is_one_clear_error(tmp_path):
    """intermediate 96 over 2 ranks: down_proj's 48 input columns per rank cut a group of 32."""
    write_gptq(tmp_path, LlamaConfig(**{**CONFIG, "intermediate_size": 96}), group_size=32)
    with pytest.raises(QuantizationError, match=r"mlp.down_proj: this rank's input columns \[\(0, 48\)\] of 96 split "
                                                r"the checkpoint's int32 words of 8 codes or groups of 32 columns"):
        _params(tmp_path, 2, 0)


def test_a_slice_inside_an_fp8_block_is_one_clear_error(tmp_path):
    """Blocks of 32 over 2 ranks: k_proj's 32 rows (2 KV heads of 16) split at 16, inside a block."""
    write_fine_grained_fp8(tmp_path, LlamaConfig(**CONFIG), block=32)
    with pytest.raises(QuantizationError, match=r"self_attn.k_proj: this rank's slice \[\(0, 16\)\] cuts FP8 "
                                                r"weight blocks of 32"):
        _params(tmp_path, 2, 0)


def test_a_column_slice_inside_a_packed_word_is_one_clear_error(tmp_path):
    """AWQ packs 8 output columns a word: k_proj's 24 rows (2 KV heads of 12) split at 12."""
    write_awq(tmp_path, LlamaConfig(**{**CONFIG, "head_dim": 12}), group_size=8)
    with pytest.raises(QuantizationError, match=r"k_proj.qweight: the shard boundaries \[\(12, 24\)\] of 24 fall "
                                                r"inside its groups or packed words \(3 along dim 1\)"):
        _params(tmp_path, 2, 1)


def _tp2_matches_tp1(path, overrides=()) -> None:
    """Greedy tokens identical, logits within 1e-4 of the largest."""
    ids = torch.tensor([PROMPTS[0]])
    params = SamplingParams(max_tokens=8, temperature=0.0)
    one = LLM(path, overrides=list(overrides), **RUNTIME)
    want_logits = one.model.logits(ids)
    want = [o.token_ids for o in one.generate(PROMPTS, params)]
    llm = LLM(path, overrides=list(overrides), tensor_parallel_size=2, **RUNTIME)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
        got = llm.engine.executor.full_logits(ids, torch.arange(ids.shape[1])[None])
        assert (got - want_logits).abs().max() <= 1e-4 * want_logits.abs().max()
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kind", ["gptq_act_order", pytest.param("gptq", marks=pytest.mark.slow),
                                  pytest.param("awq", marks=pytest.mark.slow),
                                  pytest.param("fine_grained_fp8", marks=pytest.mark.slow)])
def test_llm_at_tp2_matches_tp1(tmp_path, kind):
    _write(tmp_path, kind)
    _tp2_matches_tp1(tmp_path)


@pytest.mark.parametrize("kind", ["gptq_act_order", pytest.param("online_int4", marks=pytest.mark.slow)])
def test_fused_projections_at_tp2_match_tp1(tmp_path, kind):
    """Phi-3 stores q/k/v (4 query, 2 KV heads: parts of unequal size) and gate/up fused: each rank's
    part of each reads its own slice of the one quantized tensor, under its own parameter names."""
    _write(tmp_path, kind, Phi3Config(**CONFIG, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    _tp2_matches_tp1(tmp_path, ["quantization.algo=int4", "quantization.group_size=32"] if kind == "online_int4" else ())
