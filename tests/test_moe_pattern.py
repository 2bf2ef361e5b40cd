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
