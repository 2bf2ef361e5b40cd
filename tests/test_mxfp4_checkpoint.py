"""OpenAI's MXFP4 checkpoints (GPT-OSS): the experts' e2m1 blocks and e8m0 scales dequantized by transformers as
`load_weights` loads them; logits against HF loading the same checkpoint, and TP 2 tokens against TP 1."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config

from autodeploy.llm import LLM, SamplingParams
from autodeploy.optimizer import optimize_model

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
PROMPTS = [[17, 301, 42, 7, 250, 99, 5, 128], [4, 8, 15, 16, 23, 42]]


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] -> e2m1 codes two to a byte [E, out, in / 32, 16] (low nibble first) and e8m0 scales
    [E, out, in / 32], one per 32 values: the layout of openai/gpt-oss-20b's experts."""
    groups = w.reshape(*w.shape[:2], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = (groups / torch.exp2(exponent)[..., None])[..., None].sub(E2M1).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    """A tiny GPT-OSS saved as OpenAI ships it: bf16 everywhere but the experts, which are MXFP4."""
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    config = GptOssConfig(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=6,
                          layer_types=["sliding_attention", "full_attention"], num_local_experts=8,
                          num_experts_per_tok=2)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # HF's [E, in, out]: stored [E, out, in]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4(tensor.float().transpose(1, 2))
        else:
            tensors[name] = tensor.contiguous()
    for file in path.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    fields = json.loads((path / "config.json").read_text())
    fields["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(fields))
    return path


def test_logits_equal_hf_loading_the_same_checkpoint(gpt_oss_mxfp4):
    opt = optimize_model(gpt_oss_mxfp4, overrides=["model.device=cpu", "model.dtype=float32"], progress=False)
    reports = {r.name: r.matched for r in opt.reports}
    assert reports["match_moe"]["moe"] == 2 and reports["load_weights"]["converted"] > 0
    hf = AutoModelForCausalLM.from_pretrained(gpt_oss_mxfp4, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        ours, want = opt.logits(ids), hf(ids).logits
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tp2_tokens_equal_tp1(gpt_oss_mxfp4):
    runtime = dict(max_batch_size=4, max_num_tokens=64, overrides=["model.dtype=float32",
                                                                   "transforms.insert_kv_cache.num_blocks=32"])
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = [o.token_ids for o in LLM(gpt_oss_mxfp4, **runtime).generate(PROMPTS, params)]
    llm = LLM(gpt_oss_mxfp4, tensor_parallel_size=2, **runtime)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    finally:
        llm.shutdown()


def test_online_quantization_on_top_is_one_clear_error(gpt_oss_mxfp4):
    from autodeploy.errors import QuantizationError

    with pytest.raises(QuantizationError, match="quantization 'fp8' on a mxfp4 checkpoint is not supported"):
        optimize_model(gpt_oss_mxfp4, overrides=["model.device=cpu", "quantization.algo=fp8"], progress=False)
