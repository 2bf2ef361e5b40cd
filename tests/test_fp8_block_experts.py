"""FP8 MoE experts in B x B weight blocks (Qwen3-30B-A3B-FP8 / DeepSeek-V3's layout): fp8_moe's reference with
`weight_block` against explicitly dequantized weights and activations; transformers' fine-grained FP8 and
compressed-tensors FP8_BLOCK checkpoints read as stored; online quantization; tensor parallelism (TP 2 tokens
equal TP 1's); one-line errors for blocks that cannot be stacked or sliced."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from autodeploy.errors import QuantizationError
from autodeploy.kernels.quant_format import dequantize_fp8, quantize_fp8_blocks
from autodeploy.optimizer import optimize_model
from conftest import save_tiny_checkpoint
from quant_moe_fixtures import dequantized_moe_reference, write_compressed_tensors_moe, write_fine_grained_fp8_moe
from test_quantize_checkpoint_moe import (COMMON, EXPERTS, INNER, NO_CACHE, PROMPT, _compare, _config, _ours,
                                          _tokens_at_tp2_equal_tp1)

ops = torch.ops.autodeploy
LAYERS = COMMON["num_hidden_layers"]


def _blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = zip(*(quantize_fp8_blocks(w[e], block) for e in range(w.shape[0])))
    return torch.stack(q), torch.stack(s)


def _quantized_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    q, scale = ops.quantize_fp8_per_token(x, block)
    return q.float() * scale.repeat_interleave(block, -1)[..., :x.shape[-1]]


@pytest.mark.parametrize("block,hidden,inner", [(16, 64, 32), (32, 80, 48)])  # short last blocks along K and N
def test_reference_quantizes_activations_in_the_blocks_groups(block, hidden, inner):
    torch.manual_seed(block)
    experts, tokens = 3, 5
    (q_gu, s_gu), (q_d, s_d) = _blocks(torch.randn(experts, 2 * inner, hidden), block), \
        _blocks(torch.randn(experts, hidden, inner), block)
    x = torch.randn(tokens, hidden)
    ids, weights = torch.randint(0, experts, (tokens, 2)), torch.rand(tokens, 2)
    got = ops.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "silu", weight_block=block)
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for slot in range(2):
            e = ids[t, slot].item()
            w_gu, w_d = dequantize_fp8(q_gu[e], s_gu[e], block), dequantize_fp8(q_d[e], s_d[e], block)
            gate, up = (_quantized_activations(x[t:t + 1], block) @ w_gu.t()).chunk(2, -1)
            h = _quantized_activations(F.silu(gate) * up, block)
            want[t] += weights[t, slot] * (h @ w_d.t())[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_block_experts_need_block_scales_and_dynamic_activations():
    q_gu, s_gu = _blocks(torch.randn(2, 64, 32), 16)
    q_d, s_d = _blocks(torch.randn(2, 32, 32), 16)
    args = (torch.randn(3, 32), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(Exception, match="must be \\[E, N / B, K / B\\]"):
        torch.library.opcheck(ops.fp8_moe.default, (*args, q_gu, torch.ones(2, 64), q_d, s_d, "silu"),
                              {"weight_block": 16}, test_utils=("test_faketensor",))
    with pytest.raises(Exception, match="no static input scales"):
        torch.library.opcheck(ops.fp8_moe.default, (*args, q_gu, s_gu, q_d, s_d, "silu"),
                              {"weight_block": 16, "w_gate_up_input_scale": torch.ones(2),
                               "w_down_input_scale": torch.ones(2)}, test_utils=("test_faketensor",))


def _assert_block_experts_as_stored(opt, reference, block: int) -> None:
    """Stacked e4m3 codes and [E, N / B, K / B] scales, dequantized, are exactly the checkpoint's weights."""
    params, ref = dict(opt.gm.named_parameters()), dict(reference.named_parameters())
    for layer in range(LAYERS):
        for weight in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{weight}"
            codes, scale = params["model." + name], params["model." + name + "_scale"]
            assert codes.dtype == torch.float8_e4m3fn and scale.dim() == 3, name
            deq = torch.stack([dequantize_fp8(codes[e], scale[e], block) for e in range(codes.shape[0])])
            assert torch.equal(deq, ref[name].detach()), name


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_fine_grained_fp8_experts_load_as_stored(tmp_path, kind):
    model, dequantized = write_fine_grained_fp8_moe(tmp_path, _config(kind), block=16)
    opt, matched = _ours(tmp_path)
    assert matched["fp8_fp8_experts"] == EXPERTS * LAYERS and matched["fp8_fp8_linear"] == 4 * LAYERS
    params = dict(opt.gm.named_parameters())
    assert params["model.model.layers.0.mlp.experts.gate_up_proj_scale"].shape == (EXPERTS, 2 * INNER // 16, 4)
    assert params["model.model.layers.0.mlp.experts.down_proj_scale"].shape == (EXPERTS, 4, INNER // 16)
    moe = [n for n in opt.gm.graph.nodes if "fp8_moe" in str(n.target)]
    assert len(moe) == LAYERS and all(n.kwargs["weight_block"] == 16 for n in moe)
    reference = dequantized_moe_reference(model, dequantized)
    _assert_block_experts_as_stored(opt, reference, 16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # on the CPU: dequantized
    with torch.no_grad():
        torch.testing.assert_close(hf(PROMPT).logits, reference(PROMPT).logits)  # HF reads the blocks as written
    _compare(opt, hf, 0.06)


def test_compressed_tensors_block_experts_load_as_stored(tmp_path):
    """Reference: the writer's dequantized weights (transformers 5's expert decompressor multiplies codes by
    scales elementwise and fails on block scales, so HF cannot load this checkpoint here)."""
    model, dequantized = write_compressed_tensors_moe(tmp_path, _config("qwen3_moe"), "FP8_BLOCK", group_size=16)
    opt, matched = _ours(tmp_path)
    assert matched["compressed-tensors_fp8_experts"] == EXPERTS * LAYERS
    reference = dequantized_moe_reference(model, dequantized)
    _assert_block_experts_as_stored(opt, reference, 16)
    _compare(opt, reference, 0.06)


def test_gate_rows_that_end_inside_a_block_are_refused(tmp_path):
    """Gate's and up's block scales stack into one GEMM's only when gate fills whole blocks."""
    config = Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=24, num_experts=EXPERTS,
                            num_experts_per_tok=2)
    write_fine_grained_fp8_moe(tmp_path, config, block=16)
    with pytest.raises(QuantizationError, match=r"experts\.0\.gate_proj: 24 rows do not fill whole FP8 weight "
                                                r"blocks of 16"):
        optimize_model(tmp_path, overrides=NO_CACHE, progress=False)


def test_a_tp_slice_that_cuts_expert_blocks_is_refused(tmp_path):
    write_fine_grained_fp8_moe(tmp_path, _config("qwen3_moe"), block=32)  # 16-row slices of 32-row blocks
    with pytest.raises(QuantizationError, match="cuts FP8 weight blocks of 32"):
        optimize_model(tmp_path, overrides=NO_CACHE + ["parallel.tensor_parallel_size=2", "parallel.rank=0"],
                       progress=False)


def test_online_block_experts(tmp_path):
    """quantization.weight_block_size quantizes the experts in blocks too (each expert's own)."""
    save_tiny_checkpoint(tmp_path, _config("qwen3_moe"))
    ref = optimize_model(tmp_path, overrides=NO_CACHE, progress=False).logits(PROMPT)
    opt = optimize_model(tmp_path, overrides=NO_CACHE + ["quantization.algo=fp8", "quantization.weight_block_size=16",
                                                         "quantization.act_group_size=16"], progress=False)
    assert not [w for r in opt.reports for w in r.warnings]
    params = dict(opt.gm.named_parameters())
    assert params["model.model.layers.1.mlp.experts.gate_up_proj_scale"].shape == (EXPERTS, 2 * INNER // 16, 4)
    err = (opt.logits(PROMPT) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.06


@pytest.mark.parametrize("expert_parallel", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fine_grained_fp8_experts_at_tp2_give_tp1_tokens(tmp_path, expert_parallel):
    write_fine_grained_fp8_moe(tmp_path, _config("qwen3_moe"), block=16)
    _tokens_at_tp2_equal_tp1(tmp_path, f"parallel.enable_expert_parallel={str(expert_parallel).lower()}")


@pytest.mark.slow
def test_online_block_experts_at_tp2_give_tp1_tokens(tmp_path):
    save_tiny_checkpoint(tmp_path, _config("qwen3_moe"))
    _tokens_at_tp2_equal_tp1(tmp_path, "quantization.algo=fp8", "quantization.weight_block_size=16",
                             "quantization.act_group_size=16", "parallel.enable_expert_parallel=false")
