"""Which pre-quantized format a checkpoint is in, and the reader for it.

A format answers, per linear module path, the LinearScheme its stored tensors are in (None: stored
unquantized) and a LayerLoad that turns them into the canonical layout of kernels/quant_format.py
without dequantizing. Whether a module is quantized is read off the tensors the checkpoint holds
(the format's marker key), not re-derived from target / ignore rules, so it cannot disagree with them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from autodeploy.errors import QuantizationError

from .loading import LayerLoad
from .schemes import LinearScheme

SUPPORTED = ("compressed-tensors (FP8 W8A8 static or dynamic, per tensor, channel or block; W4A16 / W8A16 "
             "pack-quantized, symmetric or not), ModelOpt FP8, transformers' fine-grained FP8 (128 x 128 blocks: "
             "Qwen3-FP8, DeepSeek-V3), GPTQ 4/8-bit, AWQ 4-bit GEMM, MXFP4 experts (GPT-OSS; dequantized on load)")


class CheckpointFormat:
    """A pre-quantized checkpoint: subclasses know one format's config and tensor layout."""

    method: str = ""
    dequantized_on_load = False  # transformers dequantizes its quantized tensors as it loads them (MXFP4)

    def __init__(self, config: dict, keys: frozenset[str]):
        self.config = config
        self.keys = keys

    def scheme_for(self, path: str) -> LinearScheme | None:
        raise NotImplementedError

    def layer_load(self, path: str, scheme: LinearScheme, out_features: int, in_features: int,
                   scale_dtype: torch.dtype, params: dict[str, str]) -> LayerLoad:
        raise NotImplementedError

    def describe(self, scheme: LinearScheme) -> str:
        """e.g. 'gptq int4 group 128', for messages."""
        detail = f" group {scheme.group_size}" if scheme.kind == "int" and scheme.group_size != -1 else ""
        detail = f" blocks of {scheme.weight_block}" if scheme.weight_block else detail
        return f"{self.method} {scheme.name}{detail}"


def unsupported(method: str, what: str) -> QuantizationError:
    return QuantizationError(f"unsupported quantization scheme in the checkpoint: {method} {what} (supported: {SUPPORTED})")


def _checkpoint_keys(files) -> frozenset[str]:
    from safetensors import safe_open

    keys = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return frozenset(keys)


def _quant_config(path: Path) -> dict | None:
    """config.json's quantization_config, or ModelOpt's hf_quant_config.json (as quant_method 'modelopt')."""
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config"):
        return dict(config["quantization_config"])
    modelopt = path / "hf_quant_config.json"
    if modelopt.exists():
        return {"quant_method": "modelopt", **json.loads(modelopt.read_text()).get("quantization", {})}
    return None


@lru_cache(maxsize=8)
def _format_at(path: str, files: tuple[str, ...]) -> CheckpointFormat | None:
    from .compressed_tensors import CompressedTensorsFormat
    from .fine_grained_fp8 import FineGrainedFp8Format
    from .gptq_awq import AwqFormat, GptqFormat
    from .modelopt import ModelOptFormat
    from .mxfp4 import Mxfp4Format

    config = _quant_config(Path(path))
    if config is None:
        return None
    formats = {f.method: f for f in (CompressedTensorsFormat, ModelOptFormat, GptqFormat, AwqFormat,
                                     FineGrainedFp8Format, Mxfp4Format)}
    method = str(config.get("quant_method", "")).lower()
    if method not in formats:
        raise unsupported(method or "(no quant_method)", "checkpoints")
    return formats[method](config, _checkpoint_keys(files))


def checkpoint_format(source) -> CheckpointFormat | None:
    """The pre-quantized format of `source`'s checkpoint, None for an unquantized one (or config-only)."""
    if not source.weight_files:
        return None
    return _format_at(str(source.path), tuple(str(f) for f in source.weight_files))
