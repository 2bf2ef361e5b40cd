"""quantize_from_checkpoint: pre-quantized tiny checkpoints load as stored and match their reference.

References: HF transformers loading the same compressed-tensors checkpoint (its quantizer runs on
CPU); for ModelOpt FP8, GPTQ and AWQ, whose HF integrations need CUDA-only packages (modelopt,
gptqmodel / optimum, autoawq), the explicit dequantized model the fixture writer returns
(HF Llama holding weights dequantized from the codes the writer stored, computed by the writer,
not by autodeploy's converters). FP8 W8A8 also rounds activations to e4m3, which the dequantized
reference does not, so those compare with a looser tolerance; weight-only schemes must agree
to float32 accumulation noise.
"""

import json

import pytest
import torch
from transformers import LlamaConfig

from autodeploy.errors import QuantizationError
from autodeploy.optimizer import optimize_model
from quant_fixtures import (dequantized_reference, write_awq, write_compressed_tensors, write_fine_grained_fp8,
                            write_gptq, write_modelopt_fp8)

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
PROMPT = torch.tensor([[3, 17, 42, 9, 100, 7, 64, 5]])
NO_CACHE = ["transforms.insert_kv_cache.enabled=false"]
QUANTIZED_DTYPES = {torch.float8_e4m3fn, torch.int32}


def _config():
    return LlamaConfig(**CONFIG)


def _greedy(logits_of, ids: torch.Tensor, steps: int = 6) -> list[int]:
    for _ in range(steps):
        ids = torch.cat([ids, logits_of(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, PROMPT.shape[1]:].tolist()


def _ours(path):
    opt = optimize_model(path, overrides=NO_CACHE, progress=False)
    report = next(r for r in opt.reports if r.name == "quantize_from_checkpoint")
    assert not [w for r in opt.reports for w in r.warnings]  # every stored-quantized linear matched, fusion silent
    return opt, report.matched


def _assert_quantized(opt, matched: dict, op_name: str) -> None:
    """All 14 linears but lm_head run the quantized op over quantized params: nothing dequantized
    (and q/k/v, gate/up fused: 4 quantized GEMMs per layer)."""
    linears = sum(v for k, v in matched.items() if k.endswith("_linear"))
    assert linears == 7 * CONFIG["num_hidden_layers"]
    ops = [n for n in opt.gm.graph.nodes if n.op == "call_function"]
    assert sum(op_name in str(n.target) for n in ops) == 4 * CONFIG["num_hidden_layers"]
    assert sum(str(n.target) == "autodeploy.linear.default" for n in ops) == 1  # lm_head
    for name, p in opt.gm.named_parameters():
        if ".layers." in name and name.endswith(("proj.weight", "qweight")):
            assert p.dtype in QUANTIZED_DTYPES, name
    assert matched["weight_bytes_after"] < matched["weight_bytes_before"]


def _compare(opt, reference, rel_tol: float) -> None:
    with torch.no_grad():
        ref = reference(PROMPT).logits
        ours = opt.logits(PROMPT)
        assert (ours - ref).abs().max() <= rel_tol * ref.abs().max()
        assert _greedy(opt.logits, PROMPT) == _greedy(lambda ids: reference(ids).logits, PROMPT)


@pytest.mark.parametrize("preset,op,rel_tol", [
    ("FP8", "fp8_linear", 0.05), ("FP8_DYNAMIC", "fp8_linear", 0.05), ("FP8_BLOCK", "fp8_linear", 0.05),
    ("W8A16", "int_linear", 1e-4), ("W4A16", "int_linear", 1e-4), ("W4A16_ASYM", "int_linear", 1e-4),
])
def test_compressed_tensors_matches_hf(tmp_path, preset, op, rel_tol):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    write_compressed_tensors(tmp_path, _config(), preset)
    opt, matched = _ours(tmp_path)
    assert matched.get(f"compressed-tensors_{'fp8' if op == 'fp8_linear' else 'int' + preset[1]}_linear") == 14
    _assert_quantized(opt, matched, op)
    zeros = _params_ending(opt, ".zeros")  # asymmetric: zero points as stored (codes), one tensor per GEMM
    assert len(zeros) == (4 * CONFIG["num_hidden_layers"] if preset.endswith("ASYM") else 0)
    # HF's compressed modules register asymmetric zero points unpacked and refuse the packed ones stored
    # (transformers 5.24, compressed-tensors 0.20): it loads them decompressed by the library instead.
    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if preset.endswith("ASYM") else {}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **kwargs).eval()
    _compare(opt, hf, rel_tol)


def test_compressed_tensors_weight_only_matches_explicit_dequantization(tmp_path):
    """The library's own fake-quantized weights (not HF's loader) as a second reference."""
    state = write_compressed_tensors(tmp_path, _config(), "W4A16")
    opt, _ = _ours(tmp_path)
    _compare(opt, dequantized_reference(_config(), state), 1e-4)


def _against_dequantized(path, state: dict, counted: str, op: str, rel_tol: float):
    """Load a pre-quantized checkpoint, check it stays quantized, compare with the dequantized reference."""
    opt, matched = _ours(path)
    assert matched[counted] == 14
    _assert_quantized(opt, matched, op)
    _compare(opt, dequantized_reference(_config(), state), rel_tol)
    return opt


def _params_ending(opt, suffix: str) -> list[str]:
    return [n for n, _ in opt.gm.named_parameters() if n.endswith(suffix)]


def test_modelopt_fp8(tmp_path):
    state = write_modelopt_fp8(tmp_path, _config())
    opt = _against_dequantized(tmp_path, state, "modelopt_fp8_linear", "fp8_linear", 0.05)
    assert len(_params_ending(opt, "input_scale")) == 4 * CONFIG["num_hidden_layers"]  # static scales used, one per GEMM


def test_fine_grained_fp8_matches_hf(tmp_path):
    """transformers' own fp8 quantizer loading the checkpoint (on the CPU it dequantizes the blocks) and the
    writer's dequantized weights: both references; the block scales stay as stored, one per 32 x 32 tile."""
    from transformers import AutoModelForCausalLM

    state = write_fine_grained_fp8(tmp_path, _config(), block=32)
    opt, matched = _ours(tmp_path)
    assert matched["fp8_fp8_linear"] == 14
    _assert_quantized(opt, matched, "fp8_linear")
    scales = dict(opt.gm.named_parameters())
    assert scales["model.model.layers.0.mlp.down_proj.weight_scale"].shape == (2, 4)  # [64 / 32, 128 / 32]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref, explicit, ours = hf(PROMPT).logits, dequantized_reference(_config(), state)(PROMPT).logits, opt.logits(PROMPT)
    torch.testing.assert_close(ref, explicit)  # HF reads the blocks as the writer made them
    # activations rounded to e4m3 in groups of 32 too, which neither reference does (so no greedy equality here:
    # this random model's top logits lie closer than that rounding)
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()


def test_fine_grained_fp8_refuses_what_it_cannot_hold(tmp_path):
    write_fine_grained_fp8(tmp_path, _config(), block=32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 64]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"fp8 FP8 weight blocks \[32, 64\] \(square"):
        optimize_model(tmp_path, overrides=NO_CACHE, progress=False)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_static_input_scale_must_be_positive_and_finite(tmp_path, bad):
    """Activations are divided by it: a zero or NaN input_scale in a checkpoint is a one-line error naming it."""
    from safetensors.torch import load_file, save_file

    write_modelopt_fp8(tmp_path, _config())
    path = next(tmp_path.glob("*.safetensors"))
    state = load_file(path)
    state["model.layers.1.mlp.down_proj.input_scale"] = torch.tensor(bad)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.mlp\.down_proj\.input_scale must be a "
                                                r"positive finite number, got"):
        optimize_model(tmp_path, overrides=NO_CACHE, progress=False)


def test_modelopt_kv_cache_scales_reach_an_fp8_cache(tmp_path):
    from safetensors.torch import load_file

    state = write_modelopt_fp8(tmp_path, _config(), kv_cache=True)
    stored = load_file(tmp_path / "model.safetensors")
    expected = [stored[f"model.layers.{i}.self_attn.{kind}_proj.{kind}_scale"].item() for i in range(2) for kind in "kv"]
    opt = optimize_model(tmp_path, overrides=["quantization.kv_cache_dtype=fp8"], progress=False)
    assert next(r for r in opt.reports if r.name == "quantize_from_checkpoint").matched["kv_cache_scales"] == 2
    cached = [n for n in opt.gm.graph.nodes if "cached_attention" in str(n.target)]
    assert [scale for n in cached for scale in n.args[-2:]] == pytest.approx(expected)
    # Logits only: the random tiny model's top logits nearly tie, and e4m3 K/V rounding flips later greedy tokens.
    with torch.no_grad():
        ref = dequantized_reference(_config(), state)(PROMPT).logits
    assert (opt.logits(PROMPT) - ref).abs().max() <= 0.08 * ref.abs().max()


@pytest.mark.parametrize("bits,act_order,symmetric", [(4, False, True), (4, True, True), (4, False, False),
                                                      (8, True, False)])
def test_gptq(tmp_path, bits, act_order, symmetric):
    state = write_gptq(tmp_path, _config(), bits=bits, act_order=act_order, symmetric=symmetric)
    opt = _against_dequantized(tmp_path, state, f"gptq_int{bits}_linear", "int_linear", 1e-4)
    assert len(_params_ending(opt, "g_idx")) == (4 * CONFIG["num_hidden_layers"] if act_order else 0)  # one per GEMM


def test_awq(tmp_path):
    _against_dequantized(tmp_path, write_awq(tmp_path, _config()), "awq_int4_linear", "int_linear", 1e-4)
