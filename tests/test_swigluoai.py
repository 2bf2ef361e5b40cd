"""GPT-OSS's experts as `autodeploy::moe` with activation `swigluoai` (clamped SwiGLU on alternating gate / up
rows): the layout read from HF's own module by evaluating its gate, the reference against HF's experts forward, and
the Triton gated activation and MoE backends (bf16 and e4m3 experts, interpreter on CPU) with values past the
clamps, fresh outputs poisoned."""

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels import triton_moe
from autodeploy.kernels.gated_act import SWIGLUOAI_LIMIT
from autodeploy.patterns.moe import ExpertsLayout, experts_layout
from test_triton_moe import _fp8_experts, _inputs, poisoned  # noqa: F401  (the fixture)

ops = torch.ops.autodeploy


def _gpt_oss_experts(limit: float = 7.0, seed: int = 0) -> GptOssExperts:
    config = GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=4, swiglu_limit=limit)
    experts = GptOssExperts(config)
    g = torch.Generator().manual_seed(seed)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return experts


def test_gpt_oss_gate_is_swigluoai_and_other_limits_are_not():
    assert experts_layout(_gpt_oss_experts()) == ExpertsLayout("swigluoai", transposed=True, has_bias=True)
    assert "custom gating" in experts_layout(_gpt_oss_experts(limit=9.0))


def test_reference_matches_gpt_oss_experts():
    """HF's forward (interleaved [E, H, 2I] weights, biases, its own loop) against the op on the same parameters."""
    experts = _gpt_oss_experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 64, generator=g) * 3
    weights, ids = torch.randn(11, 4, generator=g).softmax(-1).topk(2, dim=-1)
    with torch.no_grad():
        want = experts(x, ids, weights)
        got = ops.moe(x, ids, weights, experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2),
                      "swigluoai", experts.gate_up_proj_bias, experts.down_proj_bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gated_act(dtype, poisoned):
    from autodeploy.kernels.triton_gated_act import _launch
    from autodeploy.kernels.triton_layout import as_rows

    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(5, 2 * 48, generator=g) * 6).to(dtype)  # past the clamps at +-7
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    rows = [as_rows(t, unit_columns=False) for t in (gate, up)]
    assert rows[0].data_ptr() == gate.data_ptr() and rows[1].stride() == (96, 2)  # read in place, no copy
    assert (gate.float() > SWIGLUOAI_LIMIT).any() and (up.float().abs() > SWIGLUOAI_LIMIT).any()
    want = ops.gated_act(gate, up, "swigluoai")
    got = _launch(gate, up, "swigluoai")
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item())


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (37, 4)])
def test_triton_moe(tokens, top_k, poisoned):
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = _inputs(tokens, top_k, 6, 64, 32, torch.bfloat16, True, 4)
    w_gate_up = w_gate_up * 6  # gate / up values past the clamps
    want = ops.moe(x, ids, weights, w_gate_up, w_down, "swigluoai", b_gate_up, b_down)
    got = triton_moe.moe(x, ids, weights, w_gate_up, w_down, "swigluoai", b_gate_up, b_down)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_triton_fp8_moe(poisoned):
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = _inputs(9, 2, 5, 64, 32, torch.bfloat16, True, 5)
    q_gu, s_gu = _fp8_experts(w_gate_up.float() * 6, "channel", 0)
    q_d, s_d = _fp8_experts(w_down.float(), "channel", 0)
    want = ops.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "swigluoai", b_gate_up, b_down)
    got = triton_moe.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "swigluoai", b_gate_up, b_down)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [
    ["quantization.algo=fp8", "quantization.weight_block_size=16", "quantization.act_group_size=16"],
    ["quantization.algo=int4", "quantization.group_size=32"],
], ids=["fp8-blocks", "int4-g32"])
def test_online_quantized_transposed_experts_at_tp2_give_tp1_tokens(tmp_path, quantization):
    """GPT-OSS's expert banks are stored [E, in, out] (gate / up alternating along out) and quantized online in
    [E, out, in]; inside-expert tensor parallelism slices them as stored. Blocks and groups that every shard
    boundary respects: TP 2's tokens are TP 1's."""
    from autodeploy.llm import LLM, SamplingParams
    from autodeploy.model_zoo_ci.runner import build_checkpoint
    from autodeploy.model_zoo_ci.zoo import load_zoo, select

    build_checkpoint(select(load_zoo(), only=["gpt-oss"])[0], tmp_path)
    runtime = dict(max_batch_size=4, max_num_tokens=64,
                   overrides=["model.dtype=float32", "transforms.insert_kv_cache.num_blocks=32", *quantization])
    prompts = [[17, 301, 42, 7, 250, 99, 5, 128], [4, 8, 15, 16, 23, 42]]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    one = LLM(tmp_path, **runtime)
    assert {r.name: r.matched for r in one.model.reports}["quantize_linear"][f"{quantization[0][18:]}_experts"] == 16
    want = [o.token_ids for o in one.generate(prompts, params)]
    two = LLM(tmp_path, tensor_parallel_size=2, **runtime)
    try:
        assert [o.token_ids for o in two.generate(prompts, params)] == want
    finally:
        two.shutdown()
