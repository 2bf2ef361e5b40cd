"""Pre-quantized tiny checkpoints in each format autodeploy reads (importable by other tests and scripts).

- compressed-tensors: made by the compressed-tensors library itself (apply a preset scheme, set
  round-to-nearest weight scales and calibrated static input scales, compress, save), as
  llm-compressor does minus the calibration algorithms.
- ModelOpt FP8, GPTQ and AWQ: no tool of theirs runs here (nvidia-modelopt, GPTQModel/AutoGPTQ and
  AutoAWQ need CUDA), so they are written from the published layouts (see
  autodeploy/quantization/modelopt.py and gptq_awq.py), with packing code written here
  independently of autodeploy's converters.
Every writer returns the weights its checkpoint means, dequantized in float32 ({HF parameter name:
tensor}), so a test can build an explicit dequantized reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

FP8_MAX = 448.0


def _random_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _quantized_linears(model) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}


def _input_amax(model, linears: dict[str, nn.Linear], outputs: bool = False) -> dict[str, float]:
    """max |input| (or |output|) of each linear over a few random tokens: the calibration of static scales."""
    amax, hooks = {}, []
    for name, m in linears.items():
        hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: amax.__setitem__(
            name, max(amax.get(name, 0.0), (out if outputs else args[0]).abs().max().item()))))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    return amax


def _save(model, path: Path, state: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if quantization_config is not None:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def _unquantized_state(model, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The tensors a format stores as they are: all but the quantized linears' weights (a tied head once)."""
    quantized = {f"{n}.weight" for n in linears}
    if getattr(model.config, "tie_word_embeddings", False):
        quantized.add("lm_head.weight")
    return {k: v for k, v in model.state_dict().items() if k not in quantized}


def _dequantized_state(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    state.update({f"{name}.weight": w for name, w in weights.items()})
    return state


# ---- compressed-tensors (the library) ----

def set_compressed_tensors_qparams(m: nn.Linear, args, input_amax: float) -> torch.Tensor:
    """Round-to-nearest qparams of a linear the library prepared (weight scale / zero point by its own
    calculate_qparams, a static input scale from the calibrated amax); returns the dequantized weight."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = m.weight.data
    if args.strategy == "tensor":
        lo, hi = w.min().reshape(1), w.max().reshape(1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif args.strategy == "block":
        rows, cols = args.block_structure
        blocks = w.reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols)
        lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
    else:
        grouped = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale, zero = calculate_qparams(lo, hi, args)
    m.weight_scale.data = scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype)
    m.weight_zero_point.data = zero.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype)
    if hasattr(m, "input_scale"):
        m.input_scale.data.fill_(input_amax / FP8_MAX)
    return fake_quantize(w, m.weight_scale, m.weight_zero_point, args).float()


def compress_linears(root: nn.Module, linears: dict[str, nn.Linear], preset: str, group_size: int,
                     input_amax: dict[str, float], ignore: list[str]):
    """Apply `preset` to `root`'s linears, set their qparams, compress in place (the library's own steps).
    Returns (the ModelCompressor, {linear name: dequantized weight})."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.strategy == "group":
        scheme.weights.group_size = group_size
    if scheme.weights.strategy == "block":  # blocks (and activation groups) the tiny model's widths divide
        scheme.weights.block_structure = [group_size, group_size]
        scheme.input_activations.group_size = group_size
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    dequantized = {name: set_compressed_tensors_qparams(m, scheme.weights, input_amax[name]) for name, m in linears.items()}
    fmt = "float-quantized" if preset.startswith("FP8") else "pack-quantized"
    compressor = ModelCompressor.from_pretrained_model(root, quantization_format=fmt)
    compressor.compress_model(root)
    return compressor, dequantized


def write_compressed_tensors(path: Path, config, preset: str, group_size: int = 32) -> dict[str, torch.Tensor]:
    """preset: FP8 (static per-tensor), FP8_DYNAMIC (per-channel, per-token), FP8_BLOCK (group_size x group_size
    weight blocks, dynamic activation groups as wide), W8A16, W4A16, W4A16_ASYM (pack-quantized; ASYM: zero points
    too)."""
    model = _random_model(config)
    linears = _quantized_linears(model)
    compressor, dequantized = compress_linears(model, linears, preset, group_size, _input_amax(model, linears),
                                               ignore=["lm_head"])
    reference = _dequantized_state(model, dequantized)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return reference


# ---- ModelOpt FP8 (published layout) ----

def write_modelopt_fp8(path: Path, config, kv_cache: bool = False) -> dict[str, torch.Tensor]:
    """quant_algo FP8: per-tensor e4m3 weights, scalar weight_scale and static input_scale per linear;
    with `kv_cache`, kv_cache_quant_algo FP8 and calibrated k_proj.k_scale / v_proj.v_scale per layer."""
    model = _random_model(config)
    linears = _quantized_linears(model)
    amax = _input_amax(model, linears)
    output_amax = _input_amax(model, linears, outputs=True) if kv_cache else {}
    state = _unquantized_state(model, linears)
    dequantized = {}
    for name, m in linears.items():
        scale = m.weight.detach().abs().max() / FP8_MAX
        q = (m.weight.detach() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = q, scale.float().reshape(())
        state[f"{name}.input_scale"] = torch.tensor(amax[name] / FP8_MAX, dtype=torch.float32)
        dequantized[name] = q.float() * scale
    for name in [n for n in linears if kv_cache and n.endswith((".k_proj", ".v_proj"))]:
        kind = name.rpartition(".")[2][0]  # k or v
        state[f"{name}.{kind}_scale"] = torch.tensor(output_amax[name] / FP8_MAX, dtype=torch.float32)
    _save(model, path, state, None)
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_cache else None, "exclude_modules": ["lm_head"]}
    (path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quant}))
    return _dequantized_state(model, dequantized)


def write_fine_grained_fp8(path: Path, config, block: int = 32) -> dict[str, torch.Tensor]:
    """transformers' fine-grained FP8 (quant_method fp8): e4m3 weights with weight_scale_inv per block x block
    tile (amax / 448, the dequantizing multiplier), dynamic activations; lm_head kept."""
    model = _random_model(config)
    linears = _quantized_linears(model)
    state = _unquantized_state(model, linears)
    dequantized = {}
    for name, m in linears.items():
        q, scale, dequantized[name] = fp8_blocks(m.weight, block)
        state[f"{name}.weight"], state[f"{name}.weight_scale_inv"] = q, scale
    _save(model, path, state, fine_grained_fp8_config(block, ["lm_head"]))
    return _dequantized_state(model, dequantized)


def fp8_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight [N, K] -> e4m3 codes, weight_scale_inv [ceil(N / block), ceil(K / block)] (amax / 448 per tile;
    the last tiles short) and the dequantized weight."""
    w = weight.detach().float()
    n, k = w.shape
    rows, cols = -(-n // block) * block, -(-k // block) * block
    tiles = F.pad(w, (0, cols - k, 0, rows - n)).reshape(rows // block, block, cols // block, block)
    scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).reshape(rows, cols)[:n, :k]
    return q.reshape(rows, cols)[:n, :k].contiguous(), scale, deq


def fine_grained_fp8_config(block: int, keep: list[str]) -> dict:
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block],
            "modules_to_not_convert": keep}


# ---- GPTQ and AWQ (published layouts) ----

def _rtn_codes(w: torch.Tensor, groups: torch.Tensor, n_groups: int, bits: int, symmetric: bool):
    """Round-to-nearest codes [N, K] with scales / zeros [N, G] for column groups `groups` [K]."""
    top = 2**bits - 1
    scales = torch.empty(w.shape[0], n_groups)
    zeros = torch.empty(w.shape[0], n_groups)
    for g in range(n_groups):
        cols = w[:, groups == g]
        if symmetric:
            scales[:, g] = cols.abs().amax(1).clamp(min=1e-8) / (2 ** (bits - 1) - 1)
            zeros[:, g] = 2 ** (bits - 1)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scales[:, g] = ((hi - lo) / top).clamp(min=1e-8)
            zeros[:, g] = (-lo / scales[:, g]).round()
    scales = scales.half()  # stored fp16, as GPTQ/AWQ do; codes are rounded against the stored scale
    codes = (w / scales.float()[:, groups]).round() + zeros[:, groups]
    return codes.clamp(0, top).to(torch.int64), scales, zeros.to(torch.int64)


def _pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Pack unsigned codes along `dim` into int32 words; nibble i of a word holds value order[i] of its group."""
    per_word = 32 // bits
    order = list(order or range(per_word))
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per_word)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for position, column in enumerate(order):
        word |= v[..., column] << (bits * position)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim) if dim != -1 else word


def _input_of(name: str) -> str:
    """Linears reading the same tensor share a key (q/k/v, gate/up): GPTQ's act-order follows the input."""
    parent, _, proj = name.rpartition(".")
    return f"{parent}.{'in' if proj in ('q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj') else proj}"


def gptq_tensors(state: dict, name: str, w: torch.Tensor, groups: torch.Tensor, n_groups: int, bits: int,
                 symmetric: bool) -> torch.Tensor:
    """Linear `name`'s GPTQ v1 tensors into `state` (round-to-nearest codes); returns the weight they mean."""
    codes, scales, zeros = _rtn_codes(w, groups, n_groups, bits, symmetric)
    state[f"{name}.qweight"] = _pack(codes.t(), bits, dim=0)
    state[f"{name}.qzeros"] = _pack((zeros - 1).t(), bits, dim=1)
    state[f"{name}.scales"] = scales.t().contiguous()
    state[f"{name}.g_idx"] = groups.to(torch.int32)
    return (codes - zeros[:, groups]).float() * scales.float()[:, groups]


def write_gptq(path: Path, config, bits: int = 4, group_size: int = 32, act_order: bool = False,
               symmetric: bool = True, order_per_linear: bool = False) -> dict[str, torch.Tensor]:
    """GPTQ v1 (`checkpoint_format: gptq`): qweight [K*b/32, N], qzeros [G, N*b/32] stored minus 1, fp16 scales.

    With `act_order`, the column order comes from the input's statistics (GPTQ's Hessian), so linears
    reading one input share it, as real checkpoints do; `order_per_linear` gives each its own instead."""
    model = _random_model(config)
    linears = _quantized_linears(model)
    state = _unquantized_state(model, linears)
    dequantized = {}
    inputs = {key: i for i, key in enumerate(dict.fromkeys(map(_input_of, linears)))}
    for i, (name, m) in enumerate(linears.items()):
        w = m.weight.detach().float()
        k = w.shape[1]
        n_groups = k // group_size
        if act_order:  # columns quantized in a permuted order; g_idx says each column's group
            seed = i if order_per_linear else inputs[_input_of(name)]
            perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
            groups = torch.empty(k, dtype=torch.int64)
            groups[perm] = torch.arange(k) // group_size
        else:
            groups = torch.arange(k) // group_size
        dequantized[name] = gptq_tensors(state, name, w, groups, n_groups, bits, symmetric)
    _save(model, path, state, {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                "desc_act": act_order, "sym": symmetric, "checkpoint_format": "gptq"})
    return _dequantized_state(model, dequantized)


def write_awq(path: Path, config, group_size: int = 32) -> dict[str, torch.Tensor]:
    """AWQ GEMM: qweight [K, N/8], qzeros [G, N/8] (columns interleaved 0,2,4,6,1,3,5,7), fp16 scales [G, N]."""
    model = _random_model(config)
    linears = _quantized_linears(model)
    state = _unquantized_state(model, linears)
    dequantized = {}
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for name, m in linears.items():
        w = m.weight.detach().float()
        groups = torch.arange(w.shape[1]) // group_size
        codes, scales, zeros = _rtn_codes(w, groups, w.shape[1] // group_size, 4, symmetric=False)
        state[f"{name}.qweight"] = _pack(codes.t(), 4, dim=1, order=order)
        state[f"{name}.qzeros"] = _pack(zeros.t(), 4, dim=1, order=order)
        state[f"{name}.scales"] = scales.t().contiguous()
        dequantized[name] = (codes - zeros[:, groups]).float() * scales.float()[:, groups]
    _save(model, path, state, {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                "version": "gemm"})
    return _dequantized_state(model, dequantized)


def dequantized_reference(config, state: dict[str, torch.Tensor]):
    """The HF model (float32) holding a writer's dequantized weights: the explicit reference."""
    model = _random_model(config)
    model.load_state_dict(state, strict=False)
    return model
