"""Quantized zoo entries: the HF reference holds the weights the quantization scheme means.

An entry's `quantization:` is either online (`{algo: fp8 | int8 | int4, group_size: N}`: the float32
checkpoint is quantized by autodeploy while it loads) or a pre-quantized checkpoint
(`{checkpoint: gptq, group_size: N}`: the linears are stored in the GPTQ v1 layout). Either way the
HF model it is compared with gets each quantized weight replaced by its dequantized value (round to
nearest, as the scheme does), so the check covers autodeploy's pipeline (swap to quantized ops,
streaming load, packing, kernels) rather than the rounding the scheme makes by design; what remains
is FP8 W8A8's activation quantization, which the entry's tolerance covers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from autodeploy.kernels.quant_format import dequantize_fp8, dequantize_int, pack_int, quantize_int
from autodeploy.quantization.schemes import online_scheme
from autodeploy.quantization.settings import QuantizationSettings

GPTQ_BITS = 4


def _dequantized(scheme, weight: torch.Tensor) -> torch.Tensor:
    """What `scheme` makes of one [N, K] weight, back in float32."""
    q = scheme.quantize(weight.float(), torch.float32)
    if "weight_scale" in q:
        return dequantize_fp8(q["weight"], q["weight_scale"])
    return dequantize_int(q["qweight"], q["scales"], q.get("zeros"), None, scheme.bits, scheme.group_size,
                          weight.shape[1])


@torch.no_grad()
def _round_trip_online(model: nn.Module, settings: QuantizationSettings) -> int:
    """Replace the linears and expert weights online quantization takes by their dequantized values."""
    scheme, count = online_scheme(settings), 0
    for path, module in model.named_modules():
        if settings.excluded(path):
            continue
        if isinstance(module, nn.Linear):
            module.weight.copy_(_dequantized(scheme, module.weight))
            count += 1
        for name in ("gate_up_proj", "down_proj"):  # fused experts [E, out, in] (transformers 5 layout)
            weight = getattr(module, name, None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 3:
                transposed = getattr(module, "is_transposed", False)  # stored [E, in, out] (GPT-OSS)
                rounded = torch.stack([_dequantized(scheme, w) for w in (weight.mT if transposed else weight)])
                weight.copy_(rounded.mT if transposed else rounded)
                count += weight.shape[0]
    return count


@torch.no_grad()
def _write_gptq(model: nn.Module, folder: Path, group_size: int) -> int:
    """Store every linear but the LM head as GPTQ v1 (symmetric, no act-order): qweight [K/8, N] packed
    along K, qzeros [G, N/8] holding zero - 1, float16 scales [G, N], g_idx; the HF model takes the
    dequantized weights."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    count = 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or path == "lm_head":
            continue
        n, k = module.weight.shape
        qweight, scales, _ = quantize_int(module.weight.float(), GPTQ_BITS, group_size, symmetric=True)
        scales = scales.half()
        zeros = torch.full((scales.shape[1], n), 2 ** (GPTQ_BITS - 1) - 1)  # v1 stores the zero point minus 1
        del state[f"{path}.weight"]
        state.update({f"{path}.qweight": qweight.t().contiguous(), f"{path}.qzeros": pack_int(zeros, GPTQ_BITS),
                      f"{path}.scales": scales.t().contiguous(),
                      f"{path}.g_idx": (torch.arange(k) // group_size).to(torch.int32)})
        module.weight.copy_(dequantize_int(qweight, scales.float(), None, None, GPTQ_BITS, group_size, k))
        count += 1
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": GPTQ_BITS, "group_size": group_size,
                                     "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return count


def prepare(quantization: dict, hf_model: nn.Module, folder: Path) -> list[str]:
    """Quantize the entry's saved checkpoint or plan its online quantization, make `hf_model` the
    dequantized reference; returns the recipe overrides the entry runs with."""
    if quantization.get("checkpoint") == "gptq":
        if not _write_gptq(hf_model, folder, quantization["group_size"]):
            raise ValueError("no linear to store as GPTQ")
        return []
    settings = QuantizationSettings(algo=quantization["algo"], group_size=quantization.get("group_size", 128))
    if not _round_trip_online(hf_model, settings):
        raise ValueError(f"no weight that {settings.algo} quantizes")
    return [f"quantization.algo={settings.algo}", f"quantization.group_size={settings.group_size}"]
