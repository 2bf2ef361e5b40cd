"""Export on the meta device: dynamic batch/sequence, and no data-less constants in the graph."""

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_outputs import CausalLMOutput

from autodeploy.export import dataless_constants, example_inputs, export_causal_lm
from autodeploy.export.patches.list_index import _as_slice


def tiny_llama_config():
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def test_meta_export_has_dynamic_batch_and_sequence():
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    gm = export_causal_lm(model, max_batch_size=8, max_seq_len=64)
    for batch, seq in [(1, 1), (3, 17), (8, 64)]:
        assert gm(*example_inputs(batch, seq)).shape == (batch, seq, 128)


def test_real_export_matches_eager():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    gm = export_causal_lm(model, max_batch_size=4, max_seq_len=32)
    ids = torch.randint(0, 128, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(gm(ids, pos), model(ids, position_ids=pos).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "index, expected",
    [([-2], slice(-2, -1, 1)), ([-1], slice(-1, None, 1)), ([0, 2, 4], slice(0, 5, 2)), ([3], slice(3, 4, 1)),
     ([2, 0], [2, 0]), ([-1, 0], [-1, 0]), ([1, 1], [1, 1]), ([], [])],
)
def test_list_index_becomes_an_equivalent_slice(index, expected):
    assert _as_slice(index) == expected
    x = torch.arange(24).view(2, 12)
    if index:
        torch.testing.assert_close(x[..., _as_slice(index)], x[..., index])


class _ListIndexed(torch.nn.Module):
    def __init__(self, index):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(6))
        self.index = index

    def forward(self, input_ids, position_ids, use_cache=False):
        return CausalLMOutput(logits=(self.weight * input_ids[..., None].float())[..., self.index])


def _export_meta(module):
    return export_causal_lm(module.to("meta"), max_batch_size=4, max_seq_len=16)


def test_progression_list_index_exports_without_constants():
    gm = _export_meta(_ListIndexed([1, 3, 5]))
    assert gm(*example_inputs(2, 5)).shape == (2, 5, 3)


def test_unrecoverable_constant_is_found():
    gm = _export_meta(_ListIndexed([4, 0]))
    assert len(dataless_constants(gm)) == 1
    assert dataless_constants(_export_meta(_ListIndexed([0, 2]))) == []


class _ScalarMasked(torch.nn.Module):
    """Masks like GPT-Neo's attention: the fill value is a scalar tensor built in forward."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, input_ids, position_ids, use_cache=False):
        x = self.weight * input_ids[..., None].float()
        fill = torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
        return CausalLMOutput(logits=torch.where(position_ids[..., None] % 2 == 0, x, fill))


def test_scalar_tensor_in_forward_exports_as_an_op():
    assert dataless_constants(_export_meta(_ScalarMasked())) == []
    module = _ScalarMasked()
    gm = export_causal_lm(module, max_batch_size=4, max_seq_len=16)
    ids, pos = torch.randint(0, 50, (2, 5)), torch.arange(5).expand(2, 5)
    torch.testing.assert_close(gm(ids, pos), module(ids, pos).logits, rtol=0, atol=0)
