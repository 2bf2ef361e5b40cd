"""fuse_shared_input_linears on quantized linears: q/k/v and gate/up become one quantized GEMM each.

Reference: the same optimized model before the fusion (every other transform ran, weights loaded),
so the only difference is the stacking; tolerances are float32 accumulation noise. Online schemes
on a tiny Llama and Qwen3, and pre-quantized fixtures whose stacking is not trivial: per-tensor FP8
scales (ModelOpt: they become per-channel vectors), static input scales (equal within a group, else
left unfused with a warning), GPTQ act-order g_idx and compressed-tensors pack-quantized tensors.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen3Config

from autodeploy.graph_utils import finalize
from autodeploy.optimizer import optimize_model
from autodeploy.transforms import TRANSFORMS
from conftest import save_tiny_checkpoint
from quant_fixtures import write_compressed_tensors, write_gptq, write_modelopt_fp8

PROMPT = torch.tensor([[3, 17, 42, 9, 100, 7, 64, 5], [1, 2, 250, 4, 99, 6, 7, 8]])
# fuse_fp8_act_quant (after this fusion) would turn fp8_linear into fp8_linear_quantized_input: its own tests
UNFUSED = ["transforms.insert_kv_cache.enabled=false", "transforms.fuse_shared_input_linears.enabled=false",
           "transforms.fuse_fp8_act_quant.enabled=false"]
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {"llama": LlamaConfig(**SHAPE), "qwen3": Qwen3Config(**SHAPE, head_dim=16)}
ONLINE = {"fp8": ["quantization.algo=fp8"],
          "int4-g32": ["quantization.algo=int4", "quantization.group_size=32"],
          "int8-channel": ["quantization.algo=int8", "quantization.group_size=-1"]}
QUANTIZED_OPS = ("autodeploy.fp8_linear.default", "autodeploy.int_linear.default")


def _quantized_ops(opt) -> int:
    return sum(str(n.target) in QUANTIZED_OPS for n in opt.gm.graph.nodes if n.op == "call_function")


def _fuse_and_compare(path, overrides=()) -> tuple[dict, list[str]]:
    """Optimize without the fusion, run it on the loaded graph, check the logits did not move.

    Returns the fusion's report counts and warnings."""
    opt = optimize_model(path, overrides=UNFUSED + list(overrides), progress=False)
    before = opt.logits(PROMPT)
    assert _quantized_ops(opt) == 7 * SHAPE["num_hidden_layers"]
    fusion = TRANSFORMS["fuse_shared_input_linears"]()
    counts = fusion.apply(opt.gm, opt.ctx)
    finalize(opt.gm)
    opt.gm.graph.lint()
    after = opt.logits(PROMPT)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    short = {k: v - counts.get(k, 0) for k, v in fusion.expected(opt.gm, opt.ctx).items() if counts.get(k, 0) < v}
    assert not short, short  # the pipeline's shortfall warning would name these
    counts["quantized_ops"] = _quantized_ops(opt)
    return counts, fusion.warnings


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    dirs = {name: tmp_path_factory.mktemp(name) for name in CONFIGS}
    for name, path in dirs.items():
        save_tiny_checkpoint(path, CONFIGS[name])
    return dirs


SLOW = pytest.mark.slow  # every scheme on each family; the default run takes one of each scheme


@pytest.mark.parametrize("family,scheme", [
    ("llama", "fp8"), ("llama", "int4-g32"), ("qwen3", "int8-channel"), pytest.param("llama", "int8-channel", marks=SLOW),
    pytest.param("qwen3", "fp8", marks=SLOW), pytest.param("qwen3", "int4-g32", marks=SLOW),
])
def test_online_quantized_qkv_and_gate_up_fuse(family_dirs, family, scheme):
    counts, warnings = _fuse_and_compare(family_dirs[family], ONLINE[scheme])
    layers = SHAPE["num_hidden_layers"]
    op = "fused_fp8_linear" if scheme == "fp8" else "fused_int_linear"
    assert (counts["qkv"], counts["gate_up"], counts[op], counts["quantized_ops"]) == (layers, layers, 2 * layers,
                                                                                       4 * layers)
    assert not warnings


def test_per_tensor_fp8_scales_become_per_channel(tmp_path):
    """ModelOpt FP8: one weight scale per tensor and a static input scale (equal for q/k/v: same input)."""
    write_modelopt_fp8(tmp_path, CONFIGS["llama"])
    counts, warnings = _fuse_and_compare(tmp_path)
    assert (counts["qkv"], counts["gate_up"], counts["quantized_ops"]) == (2, 2, 8) and not warnings


def test_unequal_static_input_scales_are_left_unfused(tmp_path):
    write_modelopt_fp8(tmp_path, CONFIGS["llama"])
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.input_scale"] = state["model.layers.0.self_attn.k_proj.input_scale"] * 2
    save_file(state, str(tmp_path / "model.safetensors"))
    counts, warnings = _fuse_and_compare(tmp_path)
    assert (counts["qkv"], counts["other"], counts["gate_up"]) == (1, 1, 2)  # layer 0: q with v, k alone
    assert counts["quantized_ops"] == 9
    assert len(warnings) == 1 and "layers.0.self_attn.k_proj" in warnings[0] and "input_scale differ" in warnings[0]


@pytest.mark.parametrize("order_per_linear", [False, True])
def test_gptq_act_order_fuses_where_g_idx_is_equal(tmp_path, order_per_linear):
    write_gptq(tmp_path, CONFIGS["llama"], act_order=True, order_per_linear=order_per_linear)
    counts, warnings = _fuse_and_compare(tmp_path)
    if order_per_linear:  # every linear its own column order: nothing stacks, and the report says why
        assert counts["quantized_ops"] == 14 and len(warnings) == 4 and all("g_idx differ" in w for w in warnings)
    else:
        assert counts["quantized_ops"] == 8 and counts["fused_int_linear"] == 4 and not warnings


def test_compressed_tensors_pack_quantized_fuses(tmp_path):
    write_compressed_tensors(tmp_path, CONFIGS["qwen3"], "W4A16")
    counts, warnings = _fuse_and_compare(tmp_path)
    assert (counts["qkv"], counts["gate_up"], counts["quantized_ops"]) == (2, 2, 8) and not warnings
