"""Pre-quantized tiny MoE checkpoints in the per-expert hub layout (importable by tests).

The HF model (transformers 5 fuses experts into [E, ...] tensors) is saved in its original per-expert
layout (`experts.{e}.gate_proj` / `w1` ...), then every linear weight but the routers', the embedding
and lm_head is quantized by the compressed-tensors library itself: one nn.Linear per checkpoint
weight in a stand-in module tree, the preset applied, round-to-nearest weight scales (and calibrated
static input scales for FP8 W8A8) set, the tree compressed. The routers stay unquantized, as
llm-compressor's MoE recipes keep them (`ignore: [lm_head, re:.*gate$]`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from quant_fixtures import (FP8_MAX, _random_model, compress_linears, fine_grained_fp8_config, fp8_blocks,
                            gptq_tensors)

ROUTER_SUFFIXES = (".gate.weight",)  # Qwen3-MoE mlp.gate, Mixtral block_sparse_moe.gate


def _hub_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its hub checkpoints use (per-expert weights)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, save_original_format=True)
        return {k: v.clone() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}


def _quantized_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and not k.endswith(ROUTER_SUFFIXES)
            and "embed" not in k and not k.startswith("lm_head")]


def _stand_in(state: dict[str, torch.Tensor], keys: list[str]) -> nn.Module:
    """A module tree holding one nn.Linear per checkpoint weight, at the checkpoint's module path."""
    root = nn.Module()
    for key in keys:
        *parents, leaf, _ = key.split(".")
        owner = root
        for name in parents:
            if not hasattr(owner, name):
                owner.add_module(name, nn.Module())
            owner = getattr(owner, name)
        linear = nn.Linear(state[key].shape[1], state[key].shape[0], bias=False)
        linear.weight.data = state[key].float().clone()
        owner.add_module(leaf, linear)
    return root


def _expert_input_amax(model) -> dict[str, float]:
    """max |input| of every linear, experts included (each sees every token: a calibration, not routing)."""
    amax: dict[str, float] = {}
    hooks = []

    def linear_hook(name):
        return lambda mod, args, out: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    def experts_hook(name):
        def hook(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            for e in range(mod.gate_up_proj.shape[0]):
                gate, up = F.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                amax[f"{name}.{e}.gate"] = amax[f"{name}.{e}.up"] = x.abs().max().item()
                amax[f"{name}.{e}.down"] = max(amax.get(f"{name}.{e}.down", 0.0), h.abs().max().item())
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(name)))
        elif hasattr(m, "gate_up_proj") and hasattr(m, "act_fn"):
            hooks.append(m.register_forward_hook(experts_hook(name)))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    return amax


def _amax_of(amax: dict[str, float], key: str) -> float:
    """A checkpoint linear's calibrated input amax (expert projections by their role)."""
    path = key.removesuffix(".weight")
    if path in amax:
        return amax[path]
    parent, _, proj = path.rpartition(".")
    role = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}[proj]
    return amax[f"{parent.replace('block_sparse_moe', 'mlp')}.{role}"]


def write_compressed_tensors_moe(path: Path, config, preset: str, group_size: int = 16):
    """preset as quant_fixtures.write_compressed_tensors. Returns (model, {hub weight key: dequantized})."""
    from safetensors.torch import save_file

    model = _random_model(config)
    state = _hub_state(model)
    keys = _quantized_keys(state)
    amax = _expert_input_amax(model)
    tree = _stand_in(state, keys)
    linears = {key: tree.get_submodule(key.removesuffix(".weight")) for key in keys}
    compressor, dequantized = compress_linears(tree, linears, preset, group_size,
                                               {key: _amax_of(amax, key) for key in keys}, ignore=[])
    compressor.quantization_config.ignore = ["lm_head", "re:.*gate$"]
    for key in keys:
        del state[key]
    state.update(tree.state_dict())
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    compressor.update_config(str(path))
    return model, dequantized


def write_fine_grained_fp8_moe(path: Path, config, block: int = 16):
    """transformers' fine-grained FP8 (Qwen3-30B-A3B-FP8's layout, written by hand as quant_fixtures'
    dense writer): every linear but the routers and lm_head, experts included, in block x block tiles with
    weight_scale_inv. Returns (model, {hub weight key: dequantized})."""
    from safetensors.torch import save_file

    model = _random_model(config)
    state = _hub_state(model)
    dequantized = {}
    for key in _quantized_keys(state):
        state[key], state[key.removesuffix("weight") + "weight_scale_inv"], dequantized[key] = fp8_blocks(
            state[key], block)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    routers = sorted({k.removesuffix(".weight") for k in state if k.endswith(ROUTER_SUFFIXES)})
    config["quantization_config"] = fine_grained_fp8_config(block, ["lm_head", *routers])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return model, dequantized


def write_modelopt_fp8_moe(path: Path, config):
    """ModelOpt quant_algo FP8 (published layout, written by hand: modelopt's export needs CUDA): per linear,
    experts included, e4m3 weight, scalar weight_scale and static input_scale. Returns (model, dequantized)."""
    import json

    from safetensors.torch import save_file

    model = _random_model(config)
    state = _hub_state(model)
    amax = _expert_input_amax(model)
    dequantized = {}
    for key in _quantized_keys(state):
        w = state[key].float()
        scale = w.abs().max() / FP8_MAX
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        path_ = key.removesuffix(".weight")
        state[key], state[f"{path_}.weight_scale"] = q, scale.reshape(())
        state[f"{path_}.input_scale"] = torch.tensor(_amax_of(amax, key) / FP8_MAX, dtype=torch.float32)
        dequantized[key] = q.float() * scale
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", "*.gate"]}
    (path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quant}))
    return model, dequantized


def write_gptq_moe(path: Path, config, bits: int = 4, group_size: int = 16):
    """GPTQ v1 (published layout, as quant_fixtures.write_gptq), experts included, no act-order.
    Returns (model, dequantized)."""
    import json

    from safetensors.torch import save_file

    model = _random_model(config)
    state = _hub_state(model)
    dequantized = {}
    for key in _quantized_keys(state):
        w = state.pop(key).float()
        groups = torch.arange(w.shape[1]) // group_size
        dequantized[key] = gptq_tensors(state, key.removesuffix(".weight"), w, groups, w.shape[1] // group_size, bits,
                                        symmetric=True)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
                                    "sym": True, "checkpoint_format": "gptq"}
    config_file.write_text(json.dumps(saved))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return model, dequantized


_ROLE_OF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": 2, "down_proj": 2}


def dequantized_moe_reference(model, dequantized: dict[str, torch.Tensor]):
    """`model` (the writer's HF model, float32) holding the dequantized weights; per-expert hub keys go
    into transformers 5's stacked gate_up_proj [E, 2I, H] (gate rows, then up) and down_proj [E, H, I]."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, w in dequantized.items():
            parts = key.split(".")
            if "experts" not in parts:
                params[key].copy_(w)
                continue
            at = parts.index("experts")
            experts = ".".join(parts[:at + 1]).replace("block_sparse_moe", "mlp")
            expert, role = int(parts[at + 1]), _ROLE_OF[parts[at + 2]]
            if role == 2:
                params[f"{experts}.down_proj"][expert].copy_(w)
            else:
                rows = w.shape[0]
                params[f"{experts}.gate_up_proj"][expert, role * rows:(role + 1) * rows].copy_(w)
    return model
