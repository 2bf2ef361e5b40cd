"""match_moe and the MoE export patch on tiny HF MoE blocks (Mixtral: softmax routing; DeepSeek-V3:
sigmoid group-limited routing with a shared expert), with real weights on CPU."""

import pytest
import torch
from torch import nn

from autodeploy.export.patches import apply_export_patches
from autodeploy.graph_utils import finalize, is_op
from autodeploy.transforms import TransformContext
from autodeploy.transforms.match_moe import MatchMoE


class Holder(nn.Module):
    """Holds the block as `.model`, like the export wrapper, so graph paths carry the same prefix."""

    def __init__(self, block):
        super().__init__()
        self.model = block

    def forward(self, x):
        return self.model(x)


def mixtral_block(implementation):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config), 32


def deepseek_block(implementation):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
    config._experts_implementation = implementation
    return DeepseekV3MoE(config), 32


def _init(block):
    torch.manual_seed(0)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    return block.eval()


def _context(block):
    return TransformContext(source=None, meta_model=block, device=torch.device("cpu"), dtype=torch.float32)


def _moe_nodes(gm):
    return [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.moe)]


@pytest.mark.parametrize("make_block", [mixtral_block, deepseek_block])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_match_moe_replaces_hf_experts_region(make_block, implementation):
    block, hidden = make_block(implementation)
    holder = Holder(_init(block))
    x = torch.randn(2, 5, hidden)
    gm = torch.export.export(holder, (x,)).module()
    assert not _moe_nodes(gm)

    matched = MatchMoE().apply(gm, _context(block))
    finalize(gm)

    assert matched["moe"] == 1 and matched["moe_replaced"] == 1
    assert len(_moe_nodes(gm)) == 1
    assert not any(is_op(n, (torch.ops.aten.histc, torch.ops.aten.index_add_)) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), holder(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_block", [mixtral_block, deepseek_block])
def test_export_patch_emits_moe_op_and_match_moe_counts_it(make_block):
    block, hidden = make_block("grouped_mm")
    holder = Holder(_init(block))
    x = torch.randn(2, 5, hidden)
    with apply_export_patches(holder):
        gm = torch.export.export(holder, (x,)).module()
    assert block.experts.config._experts_implementation == "grouped_mm"  # restored after export
    assert len(_moe_nodes(gm)) == 1

    matched = MatchMoE().apply(gm, _context(block))
    assert matched["moe"] == 1 and matched["moe_from_export"] == 1
    shared = getattr(block, "shared_experts", None)
    if shared is not None:  # shared experts stay an ordinary MLP next to the op
        assert any(n.op == "get_attr" and "shared_experts" in n.target for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), holder(x), rtol=1e-5, atol=1e-5)


def test_match_moe_expects_one_op_per_experts_module():
    block, _ = mixtral_block("grouped_mm")
    assert MatchMoE().expected(None, _context(block)) == {"moe": 1}


def test_a_float32_router_stays_float32_in_a_bf16_model(tmp_path):
    """transformers keeps DeepSeek-V3's router weight in float32 in a bf16 model (`_keep_in_fp32_modules_strict`);
    the exported graph then holds no cast for it (cleanup_noops drops the no-op), so loading must keep float32
    too: a bf16 router weight met a float32 input (every bf16 / GPU run of DeepSeek-V2 / V3 failed so)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from autodeploy.optimizer import optimize_model
    from conftest import save_tiny_checkpoint

    config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                              num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                              topk_group=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=32,
                              qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=128)
    save_tiny_checkpoint(tmp_path, config)
    opt = optimize_model(tmp_path, overrides=["model.device=cpu", "model.dtype=bfloat16",
                                              "transforms.insert_kv_cache.enabled=false"], progress=False)
    params = dict(opt.gm.named_parameters())
    assert params["model.model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert params["model.model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = hf(ids).logits.float()
    got = opt.logits(ids).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
