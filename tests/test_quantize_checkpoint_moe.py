"""Pre-quantized MoE checkpoints (per-expert hub layout) load as stored into fp8_moe / int_moe.

Checkpoints: tests/quant_moe_fixtures.py (compressed-tensors by its own library; ModelOpt FP8 and GPTQ
by hand from the published layouts). References:
- the stacked params themselves, dequantized, equal the weights each checkpoint means (exact);
- HF transformers loading the same compressed-tensors checkpoint (`dequantize=True`: transformers 5.24
  runs quantized experts only by dequantizing them at load; FP8 W8A8 then does not round activations,
  so FP8 compares within fp8's error, weight-only to float32 noise). Asymmetric pack-quantized experts,
  ModelOpt and GPTQ: HF cannot load them here (its expert decompressor drops zero points and fails the
  conversion; ModelOpt's and GPTQ's integrations need CUDA), so the reference is the HF model holding
  the dequantized weights the writer computed.
- tensor parallelism: each rank's params are exactly its slice of the TP-1 params, and LLM over two
  gloo ranks gives TP 1's greedy tokens (expert parallel and TP inside experts).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from autodeploy.errors import QuantizationError
from autodeploy.kernels.quant_format import dequantize_int
from autodeploy.llm import LLM, SamplingParams
from autodeploy.optimizer import optimize_model
from autodeploy.quantization.loading import quantized_loads
from quant_moe_fixtures import (dequantized_moe_reference, write_compressed_tensors_moe, write_gptq_moe,
                                write_modelopt_fp8_moe)

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128)
PROMPT = torch.tensor([[3, 17, 42, 9, 100, 7, 64, 5]])
NO_CACHE = ["transforms.insert_kv_cache.enabled=false", "model.device=cpu", "model.dtype=float32"]
EXPERTS, INNER, GROUP = 4, 32, 16


def _config(kind: str):
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=INNER, num_experts=EXPERTS,
                              num_experts_per_tok=2)
    return MixtralConfig(**COMMON, intermediate_size=INNER, num_local_experts=EXPERTS, num_experts_per_tok=2)


def _ours(path, *overrides):
    opt = optimize_model(path, overrides=NO_CACHE + list(overrides), progress=False)
    assert not [w for r in opt.reports for w in r.warnings]  # every quantized expert and linear matched
    return opt, next(r for r in opt.reports if r.name == "quantize_from_checkpoint").matched


def _stacked_dequantized(opt, layer: int, weight: str, bits: int) -> torch.Tensor:
    """Our stacked [E, N, K] expert weight `weight` (gate_up_proj / down_proj), dequantized."""
    params = dict(opt.gm.named_parameters())
    name = f"model.model.layers.{layer}.mlp.experts.{weight}"
    codes = params[name]
    if codes.dtype == torch.float8_e4m3fn:
        return codes.float() * params[name + "_scale"][..., None]
    zeros = params.get(name + "_zeros")
    k = codes.shape[-1] * 32 // bits
    return torch.stack([dequantize_int(codes[e], params[name + "_scales"][e], None if zeros is None else zeros[e],
                                       None, bits, GROUP, k) for e in range(codes.shape[0])])


def _assert_experts_as_stored(opt, reference, bits: int) -> None:
    """Stacked quantized params (e4m3 / int32 codes, nothing dequantized) mean the checkpoint's weights."""
    ref = dict(reference.named_parameters())
    for layer in range(COMMON["num_hidden_layers"]):
        for weight in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{weight}"
            assert dict(opt.gm.named_parameters())["model." + name].dtype in (torch.float8_e4m3fn, torch.int32)
            assert torch.equal(_stacked_dequantized(opt, layer, weight, bits), ref[name].detach()), name


def test_fp8_moe_static_input_scales_round_each_experts_input_with_its_scale():
    """The op's new inputs: expert e's gate/up input is rounded as e4m3 of x / s1[e] (saturated), its down
    input with s2[e]; an explicit loop over tokens and their experts is the reference."""
    g = torch.Generator().manual_seed(7)
    e, h, i, tokens = 3, 32, 16, 5
    w1 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(torch.float8_e4m3fn)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(torch.float8_e4m3fn)
    ws1, ws2 = torch.rand(e, 2 * i, generator=g) + 0.5, torch.rand(e, h, generator=g) + 0.5
    s1, s2 = torch.tensor([0.002, 0.004, 0.001]), torch.tensor([0.003, 0.0005, 0.002])  # 0.0005 saturates
    x = torch.randn(tokens, h, generator=g)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [1, 2], [0, 1]])
    weights = torch.rand(tokens, 2, generator=g)

    def rounded(a, scale):
        return (a / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    want = torch.zeros_like(x)
    for t in range(tokens):
        for slot in range(2):
            n = int(ids[t, slot])
            gate, up = (rounded(x[t], s1[n]) @ (w1[n].float() * ws1[n][:, None]).t()).chunk(2)
            y = rounded(torch.nn.functional.silu(gate) * up, s2[n]) @ (w2[n].float() * ws2[n][:, None]).t()
            want[t] += weights[t, slot] * y
    got = torch.ops.autodeploy.fp8_moe(x, ids, weights, w1, ws1, w2, ws2, "silu",
                                       w_gate_up_input_scale=s1, w_down_input_scale=s2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _compare(opt, reference, rel_tol: float) -> None:
    """Logits within rel_tol; greedy tokens equal for weight-only schemes. FP8 W8A8 rounds activations
    that the dequantized reference does not, and the random tiny models' top logits nearly tie, so there
    each of our greedy tokens must sit in the reference's top 3 (the GPU rule of the design card)."""
    top_k = 1 if rel_tol < 1e-3 else 3
    with torch.no_grad():
        ref = reference(PROMPT).logits
        assert (opt.logits(PROMPT) - ref).abs().max() <= rel_tol * ref.abs().max()
        ids = PROMPT
        for _ in range(6):
            step = opt.logits(ids)[:, -1:].argmax(-1)
            assert step.item() in reference(ids).logits[0, -1].topk(top_k).indices.tolist()
            ids = torch.cat([ids, step], dim=1)


@pytest.mark.parametrize("kind,preset,rel_tol", [
    ("qwen3_moe", "W4A16", 1e-4), ("mixtral", "W8A16", 1e-4), ("mixtral", "FP8_DYNAMIC", 0.06),
    ("qwen3_moe", "FP8", 0.06),
])
def test_compressed_tensors_experts_match_hf(tmp_path, kind, preset, rel_tol):
    from transformers import CompressedTensorsConfig

    model, dequantized = write_compressed_tensors_moe(tmp_path, _config(kind), preset, group_size=GROUP)
    opt, matched = _ours(tmp_path)
    scheme = "fp8" if preset.startswith("FP8") else f"int{preset[1]}"
    assert matched[f"compressed-tensors_{scheme}_experts"] == EXPERTS * COMMON["num_hidden_layers"]
    assert matched[f"compressed-tensors_{scheme}_linear"] == 4 * COMMON["num_hidden_layers"]
    op = "fp8_moe" if scheme == "fp8" else "int_moe"
    assert sum(op in str(n.target) for n in opt.gm.graph.nodes) == COMMON["num_hidden_layers"]
    input_scales = [n for n, _ in opt.gm.named_parameters() if n.endswith("_input_scale")]
    assert len(input_scales) == (2 * COMMON["num_hidden_layers"] if preset == "FP8" else 0)  # static: per GEMM
    _assert_experts_as_stored(opt, dequantized_moe_reference(model, dequantized), 4 if preset == "W4A16" else 8)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    _compare(opt, hf, rel_tol)


def test_asymmetric_int4_experts_match_their_dequantized_weights(tmp_path):
    model, dequantized = write_compressed_tensors_moe(tmp_path, _config("qwen3_moe"), "W4A16_ASYM", GROUP)
    opt, matched = _ours(tmp_path)
    assert matched["compressed-tensors_int4_experts"] == EXPERTS * COMMON["num_hidden_layers"]
    reference = dequantized_moe_reference(model, dequantized)
    _assert_experts_as_stored(opt, reference, 4)
    _compare(opt, reference, 1e-4)


def test_modelopt_fp8_experts_with_static_input_scales(tmp_path):
    """Per-tensor weight scales become per-channel rows (gate's and up's differ); the fused gate/up GEMM's
    static input scale is the larger of the two stored ones, down's its own."""
    from safetensors.torch import load_file

    model, dequantized = write_modelopt_fp8_moe(tmp_path, _config("mixtral"))
    opt, matched = _ours(tmp_path)
    assert matched["modelopt_fp8_experts"] == EXPERTS * COMMON["num_hidden_layers"]
    reference = dequantized_moe_reference(model, dequantized)
    _assert_experts_as_stored(opt, reference, 8)
    stored, params = load_file(tmp_path / "model.safetensors"), dict(opt.gm.named_parameters())
    expert = "model.layers.1.block_sparse_moe.experts.3"
    assert params["model.model.layers.1.mlp.experts.gate_up_proj_input_scale"][3] == max(
        stored[f"{expert}.w1.input_scale"], stored[f"{expert}.w3.input_scale"])
    assert params["model.model.layers.1.mlp.experts.down_proj_input_scale"][3] == stored[f"{expert}.w2.input_scale"]
    _compare(opt, reference, 0.06)


def test_gptq_int4_experts(tmp_path):
    """GPTQ's transposed codes and zero points are converted per expert by the dense reader, then stacked."""
    model, dequantized = write_gptq_moe(tmp_path, _config("mixtral"))
    opt, matched = _ours(tmp_path)
    assert matched["gptq_int4_experts"] == EXPERTS * COMMON["num_hidden_layers"]
    reference = dequantized_moe_reference(model, dequantized)
    _assert_experts_as_stored(opt, reference, 4)
    _compare(opt, reference, 1e-4)


def _act_order(groups: dict) -> None:
    groups["group_0"]["weights"]["actorder"] = "group"


def _layer1_expert0_int8(groups: dict) -> None:
    """A first config group claiming one expert as W8A16: that layer's experts would mix two schemes."""
    int8 = json.loads(json.dumps(groups["group_0"]))
    int8["weights"]["num_bits"], int8["targets"] = 8, [r"re:.*layers\.1\.mlp\.experts\.0\..*"]
    groups.update({"group_int8": int8, "group_0": groups.pop("group_0")})


def _dynamic_per_tensor_activations(groups: dict) -> None:
    groups["group_0"]["input_activations"]["strategy"] = "tensor"


@pytest.mark.parametrize("preset,edit,message", [
    ("W4A16", _act_order, r"layers\.0\.mlp\.experts: act-order \(g_idx\) experts .* not supported"),
    ("W4A16", _layer1_expert0_int8, r"layers\.1\.mlp\.experts: the experts are stored in several schemes "
                                    r"\(compressed-tensors int4 group 16, compressed-tensors int8 group 16\)"),
    ("FP8_DYNAMIC", _dynamic_per_tensor_activations, r"dynamic per-tensor activation scales are not supported"),
])
def test_experts_the_ops_cannot_take_are_a_clear_error(tmp_path, preset, edit, message):
    write_compressed_tensors_moe(tmp_path, _config("qwen3_moe"), preset, GROUP)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["quantization_config"]["config_groups"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=message):
        optimize_model(tmp_path, overrides=NO_CACHE, progress=False)


# ---- tensor parallelism ----

@pytest.fixture(scope="module")
def int4_asym_moe(tmp_path_factory):
    """Qwen3-MoE, W4A16 asymmetric group 16: codes packed along K, zero points packed along N."""
    path = tmp_path_factory.mktemp("qwen3_moe_w4a16_asym")
    write_compressed_tensors_moe(path, _config("qwen3_moe"), "W4A16_ASYM", GROUP)
    return path


def _local_params(path, rank: int, expert_parallel: bool) -> dict[str, torch.Tensor]:
    """Rank `rank`'s params; checks that its loads named only the experts it holds."""
    opt, matched = _ours(path, "parallel.tensor_parallel_size=2", f"parallel.rank={rank}",
                         f"parallel.enable_expert_parallel={str(expert_parallel).lower()}")
    assert matched["compressed-tensors_int4_experts"] == EXPERTS * COMMON["num_hidden_layers"] // (
        2 if expert_parallel else 1)
    read = {int(key.split(".experts.")[1].split(".")[0]) for key in quantized_loads(opt.gm).source_keys()
            if ".experts." in key}
    assert read == ({2 * rank, 2 * rank + 1} if expert_parallel else set(range(EXPERTS)))
    return dict(opt.gm.named_parameters())


def test_each_rank_reads_its_experts_or_its_slice_of_every_expert(int4_asym_moe):
    """Expert parallel: rank r holds experts [2r, 2r + 2). TP inside experts: rank r holds gate rows
    [16r, 16r + 16) and the same up rows of every expert (codes, group scales, zero points), and down's
    K columns [16r, 16r + 16): two packed words, one group."""
    full = dict(_ours(int4_asym_moe)[0].gm.named_parameters())
    experts = "model.model.layers.1.mlp.experts."
    for rank in range(2):
        local = _local_params(int4_asym_moe, rank, expert_parallel=True)
        for suffix in ("", "_scales", "_zeros"):
            for weight in ("gate_up_proj", "down_proj"):
                name = experts + weight + suffix
                assert torch.equal(local[name], full[name][2 * rank:2 * rank + 2]), name
        local = _local_params(int4_asym_moe, rank, expert_parallel=False)
        rows = list(range(16 * rank, 16 * rank + 16)) + list(range(INNER + 16 * rank, INNER + 16 * rank + 16))
        for suffix in ("", "_scales", "_zeros"):
            name = experts + "gate_up_proj" + suffix
            assert torch.equal(local[name], full[name][:, rows]), name
        assert torch.equal(local[experts + "down_proj"], full[experts + "down_proj"][..., 2 * rank:2 * rank + 2])
        for suffix in ("_scales", "_zeros"):
            name = experts + "down_proj" + suffix
            assert torch.equal(local[name], full[name][..., rank:rank + 1]), name


RUNTIME = dict(max_batch_size=4, max_num_tokens=64, **{"transforms.insert_kv_cache.num_blocks": 32,
                                                        "export.max_seq_len": 128, "export.max_batch_size": 4})
PROMPTS = [[1, 5, 9, 200, 31, 7, 99], [4, 8, 15, 16, 23, 42]]


def _tokens_at_tp2_equal_tp1(path, *overrides) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = [o.token_ids for o in LLM(path, overrides=list(overrides), **RUNTIME).generate(PROMPTS, params)]
    llm = LLM(path, overrides=list(overrides), tensor_parallel_size=2, **RUNTIME)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    finally:
        llm.shutdown()


@pytest.mark.parametrize("expert_parallel", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_int4_experts_at_tp2_give_tp1_tokens(int4_asym_moe, expert_parallel):
    _tokens_at_tp2_equal_tp1(int4_asym_moe, f"parallel.enable_expert_parallel={str(expert_parallel).lower()}")


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [True, False])
def test_fp8_static_mixtral_experts_at_tp2_give_tp1_tokens(tmp_path, expert_parallel):
    """Per-channel scales and per-tensor input scales: slices of either stay TP 1's values."""
    write_compressed_tensors_moe(tmp_path, _config("mixtral"), "FP8")
    _tokens_at_tp2_equal_tp1(tmp_path, f"parallel.enable_expert_parallel={str(expert_parallel).lower()}")
