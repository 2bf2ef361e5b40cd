"""quantize_linear: online FP8 / INT8 / INT4 of linears and MoE experts while an unquantized checkpoint loads.

Reference: the same checkpoint optimized without quantization (itself checked against HF eager
elsewhere). Tolerances are relative to the largest logit and sized to each scheme's rounding.
"""

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

from autodeploy.errors import QuantizationError
from autodeploy.optimizer import optimize_model
from conftest import save_tiny_checkpoint

PROMPT = torch.tensor([[3, 17, 42, 9, 100, 7, 64, 5]])
NO_CACHE = ["transforms.insert_kv_cache.enabled=false"]
TOLERANCE = {"fp8": 0.08, "int8": 0.02, "int4": 0.15}  # e4m3 keeps 3 mantissa bits of weights and activations


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_checkpoint(path, LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    return path


@pytest.fixture(scope="module")
def llama_logits(llama_dir):
    return optimize_model(llama_dir, overrides=NO_CACHE, progress=False).logits(PROMPT)


def _ops(opt) -> list[str]:
    return [str(n.target) for n in opt.gm.graph.nodes if n.op == "call_function"]


def _report(opt, name="quantize_linear"):
    return next(r for r in opt.reports if r.name == name)


@pytest.mark.parametrize("algo", ["fp8", "int8", "int4"])
def test_every_linear_but_lm_head_is_quantized(llama_dir, llama_logits, algo):
    opt = optimize_model(llama_dir, overrides=NO_CACHE + [f"quantization.algo={algo}", "quantization.group_size=32"],
                         progress=False)
    # fp8: fuse_fp8_act_quant hands each FP8 GEMM its activations quantized (tests/test_fuse_fp8_act_quant.py)
    op = "autodeploy.fp8_linear_quantized_input.default" if algo == "fp8" else "autodeploy.int_linear.default"
    ops = _ops(opt)
    assert ops.count(op) == 8 and ops.count("autodeploy.linear.default") == 1  # 7 per layer, fused to 4; lm_head kept
    report = _report(opt)
    assert report.matched[f"{algo}_linear"] == 14 and report.matched["excluded"] == 1 and not report.warnings
    ratio = report.matched["weight_bytes_after"] / report.matched["weight_bytes_before"]
    assert ratio < {"fp8": 0.6, "int8": 0.6, "int4": 0.5}[algo]  # embeddings and lm_head stay float32
    assert dict(opt.gm.named_parameters())["model.model.layers.0.self_attn.q_k_v_proj.weight" if algo == "fp8"
                                           else "model.model.layers.0.self_attn.q_k_v_proj.qweight"].dtype in (
        torch.float8_e4m3fn, torch.int32)
    logits = opt.logits(PROMPT)
    err = (logits - llama_logits).abs().max() / llama_logits.abs().max()
    assert 0 < err < TOLERANCE[algo]


def test_exclude_globs_keep_modules(llama_dir):
    opt = optimize_model(llama_dir, overrides=NO_CACHE + ["quantization.algo=int8", "quantization.group_size=-1",
                                                          "quantization.exclude=[lm_head,'*.mlp.*']"], progress=False)
    ops = _ops(opt)
    assert ops.count("autodeploy.int_linear.default") == 4  # q/k/v (fused) and o of two layers
    assert _report(opt).matched["excluded"] == 7


QUANTIZED_HEAD = "quantization.exclude=['*router*','*.gate']"  # the default list without lm_head


def test_lm_head_quantized_when_not_excluded(llama_dir, llama_logits):
    opt = optimize_model(llama_dir, overrides=NO_CACHE + ["quantization.algo=int8", "quantization.group_size=-1",
                                                          QUANTIZED_HEAD], progress=False)
    assert _ops(opt).count("autodeploy.linear.default") == 0
    assert _report(opt).matched["int8_linear"] == 15 and _report(opt).matched["excluded"] == 0
    err = (opt.logits(PROMPT) - llama_logits).abs().max() / llama_logits.abs().max()
    assert 0 < err < TOLERANCE["int8"]


def test_tied_lm_head_stays_unquantized_with_a_warning(tmp_path):
    """Tied word embeddings (SmolLM2): the LM head's weight is the embedding table, which the gather still reads."""
    save_tiny_checkpoint(tmp_path, LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, tie_word_embeddings=True))
    plain = optimize_model(tmp_path, overrides=NO_CACHE, progress=False).logits(PROMPT)
    opt = optimize_model(tmp_path, overrides=NO_CACHE + ["quantization.algo=fp8", QUANTIZED_HEAD], progress=False)
    report = _report(opt)
    assert report.matched["fp8_linear"] == 14 and report.matched["shared_weight"] == 1
    assert report.warnings == ["quantize_linear: lm_head left unquantized: the weight is shared with another op "
                               "(tied word embeddings)"]
    assert _ops(opt).count("autodeploy.linear.default") == 1
    err = (opt.logits(PROMPT) - plain).abs().max() / plain.abs().max()
    assert 0 < err < TOLERANCE["fp8"]


def test_a_shared_weight_is_found_and_not_swapped():
    """The site finder marks a linear whose weight another op reads (an embedding gather); replacing it would take
    the weight from that op, so swap_linear refuses in one line (quantize_from_checkpoint meets it that way)."""
    from torch import fx, nn

    from autodeploy.quantization.rewrite import linear_sites, swap_linear
    from autodeploy.quantization.schemes import LinearScheme

    root = nn.Module()
    root.register_parameter("w", nn.Parameter(torch.zeros(8, 4), requires_grad=False))
    graph = fx.Graph()
    x, ids, w = graph.placeholder("x"), graph.placeholder("ids"), graph.get_attr("w")
    y = graph.call_function(torch.ops.autodeploy.linear.default, (x, w))
    graph.output((y, graph.call_function(torch.ops.aten.embedding.default, (w, ids))))
    (site,) = linear_sites(fx.GraphModule(root, graph))
    assert site.shared and (site.out_features, site.in_features) == (8, 4)
    with pytest.raises(QuantizationError, match="its weight is also read by another op"):
        swap_linear(site, LinearScheme("fp8"), torch.float32)


def test_algo_none_and_auto_leave_an_unquantized_checkpoint_alone(llama_dir):
    for algo in ("none", "auto"):
        opt = optimize_model(llama_dir, overrides=NO_CACHE + [f"quantization.algo={algo}"], progress=False)
        assert not any("fp8" in o or "int_linear" in o for o in _ops(opt))


def test_group_size_must_divide_in_features(llama_dir):
    with pytest.raises(QuantizationError, match="group size 48 does not divide in_features 64"):
        optimize_model(llama_dir, overrides=NO_CACHE + ["quantization.algo=int4", "quantization.group_size=48"],
                       progress=False)


MOE_CONFIGS = {
    "mixtral": MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=128),
    "qwen3_moe": Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                num_experts_per_tok=2, head_dim=16, max_position_embeddings=128),
}


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_moe_experts_quantized_and_routers_kept(tmp_path, family):
    save_tiny_checkpoint(tmp_path, MOE_CONFIGS[family])
    prompt = PROMPT % 128
    ref = optimize_model(tmp_path, overrides=NO_CACHE, progress=False)
    ref_logits = ref.logits(prompt)
    ref_linears = _ops(ref).count("autodeploy.linear.default")
    for algo, op in (("fp8", "autodeploy.fp8_moe.default"), ("int4", "autodeploy.int_moe.default")):
        opt = optimize_model(tmp_path, overrides=NO_CACHE + [f"quantization.algo={algo}", "quantization.group_size=16"],
                             progress=False)
        ops = _ops(opt)
        assert ops.count(op) == 1 and "autodeploy.moe.default" not in ops
        assert _report(opt).matched[f"{algo}_experts"] == 4
        assert ops.count("autodeploy.linear.default") == 2  # the router and lm_head
        assert ref_linears > 2  # ... while the unquantized graph has the attention projections as linears too
        err = (opt.logits(prompt) - ref_logits).abs().max() / ref_logits.abs().max()
        assert 0 < err < TOLERANCE[algo]


def test_scale_search_setting_lowers_the_weight_error():
    """quantization.scale_search picks clipped group ranges: never a larger error than round-to-nearest."""
    from autodeploy.kernels.quant_format import dequantize_int
    from autodeploy.quantization.schemes import online_scheme
    from autodeploy.quantization.settings import QuantizationSettings

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    w[:, ::37] *= 8  # a few outliers per group, where clipping pays
    errors = {}
    for search in (False, True):
        scheme = online_scheme(QuantizationSettings(algo="int4", group_size=32, scale_search=search))
        assert scheme.scale_search is search
        q = scheme.quantize(w, torch.float32)
        deq = dequantize_int(q["qweight"], q["scales"], q.get("zeros"), None, 4, 32, 128)
        errors[search] = (deq - w).square().sum().item()
    assert errors[True] < errors[False]


def test_default_group_sizes():
    """Unset group_size: int8 per channel; int4 128, else the largest of 64 / 32 that divides; explicit sizes
    must divide, and the errors name the linear and what would fit."""
    from autodeploy.quantization.settings import QuantizationSettings

    int4, int8 = QuantizationSettings(algo="int4"), QuantizationSettings(algo="int8")
    assert [int4.group_size_for(k, "l") for k in (4096, 576, 96)] == [128, 64, 32]
    assert int8.group_size_for(576, "l") == -1 and (int4.nominal_group_size, int8.nominal_group_size) == (128, -1)
    with pytest.raises(QuantizationError, match=r"none of the default int4 group sizes \(128, 64, 32\) divides "
                                                r"in_features 40 of model.layers.0.mlp.down_proj"):
        int4.group_size_for(40, "model.layers.0.mlp.down_proj")
    explicit = QuantizationSettings(algo="int4", group_size=128)
    with pytest.raises(QuantizationError, match=r"group size 128 does not divide in_features 576 of lin \(group "
                                                r"sizes that do: 16, 32, 64, or -1 for one scale per output channel\)"):
        explicit.group_size_for(576, "lin")


def test_int4_default_falls_back_per_linear_with_a_warning(tmp_path):
    """Hidden size 96 (128 and 64 do not divide it): the six projections reading it take group 32, down_proj
    (256 columns) keeps 128; one warning lists them. int8's default is per channel, silently."""
    save_tiny_checkpoint(tmp_path, LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128))
    unquantized = optimize_model(tmp_path, overrides=NO_CACHE, progress=False).logits(PROMPT)
    for algo, groups in (("int4", {32: 6, 128: 2}), ("int8", {-1: 8})):  # per int_linear node, q/k/v, gate/up fused
        opt = optimize_model(tmp_path, overrides=NO_CACHE + [f"quantization.algo={algo}"], progress=False)
        nodes = [n for n in opt.gm.graph.nodes if n.target == torch.ops.autodeploy.int_linear.default]
        assert {g: sum(n.kwargs["group_size"] == g for n in nodes) for g in groups} == groups and len(nodes) == 8
        report = _report(opt)
        if algo == "int4":
            assert report.matched["group_size_fallbacks"] == 12
            assert report.warnings == ["quantize_linear: group size 128 does not divide the in_features of 12 linears; "
                                       "they use the largest default that does: model.layers.*.self_attn.q_proj (32), "
                                       "model.layers.*.self_attn.k_proj (32), model.layers.*.self_attn.v_proj (32), "
                                       "model.layers.*.self_attn.o_proj (32), model.layers.*.mlp.gate_proj (32), "
                                       "model.layers.*.mlp.up_proj (32)"]
        else:
            assert "group_size_fallbacks" not in report.matched and not report.warnings
        err = (opt.logits(PROMPT) - unquantized).abs().max() / unquantized.abs().max()
        assert 0 < err < {"int4": 0.3, "int8": TOLERANCE["int8"]}[algo]  # int4: down_proj at g128, coarser than g32
