"""Write a ModelOpt-FP8-style checkpoint of random weights at a config's shape (no model is built): the decoder
layers' linears as per-tensor e4m3 with a scalar weight_scale and a static input_scale, everything else bf16, as
`hf_quant_config.json` with quant_algo FP8 describes. For measuring the static-scale path end to end at a shape no
real FP8 checkpoint of which is at hand (the 8B one is ~9 GB to write; on the GPU it takes seconds).

Usage: python benchmarks/random_modelopt_fp8.py CONFIG_DIR OUT_DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

FP8_MAX = 448.0
SHARD_BYTES = 4 << 30
INPUT_AMAX = 8.0  # a plausible activation amax: the static input scale is INPUT_AMAX / 448 everywhere


def _quantized(name: str, shape: torch.Size) -> bool:
    """Decoder linears (ModelOpt leaves lm_head and the embeddings in bf16)."""
    return ".layers." in name and name.endswith("proj.weight") and len(shape) == 2


def _tensors(name: str, shape: torch.Size, device: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    if name.endswith("norm.weight"):
        return {name: torch.ones(shape, dtype=torch.bfloat16, device=device)}
    w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
    if not _quantized(name, shape):
        return {name: w.to(torch.bfloat16)}
    scale = w.abs().amax() / FP8_MAX
    prefix = name.removesuffix(".weight")
    return {name: (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
            f"{prefix}.weight_scale": scale.reshape(()).float(),
            f"{prefix}.input_scale": torch.tensor(INPUT_AMAX / FP8_MAX, dtype=torch.float32, device=device)}


def write(config_dir: Path, out_dir: Path, device: str) -> int:
    """The checkpoint's bytes written."""
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out_dir / "config.json")
    g = torch.Generator(device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal shard
        file = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in shard.items()}, out_dir / file, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
        shard = {}

    for name, param in model.named_parameters():
        for key, tensor in _tensors(name, param.shape, device, g).items():
            shard[key] = tensor
            total += tensor.numel() * tensor.element_size()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": index}))
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    (out_dir / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                              "quantization": quant}))
    return total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not (args.config_dir / "config.json").is_file():
        parser.error(f"{args.config_dir} holds no config.json")
    print(f"{write(args.config_dir, args.out_dir, args.device) / 1e9:.2f} GB written to {args.out_dir}")
